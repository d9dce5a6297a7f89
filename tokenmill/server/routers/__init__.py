"""One APIRouter per endpoint family; build_app includes each (a new family: a new module)."""
