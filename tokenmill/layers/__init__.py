"""Model building blocks shared by the architectures: attention, rotary, norm."""
