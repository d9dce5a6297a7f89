"""Executors: how EngineCore reaches its worker(s). Today one worker in this process
(uniproc.py); a tensor- or data-parallel executor implements the same interface
(base.py) over several processes."""
