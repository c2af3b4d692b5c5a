# The garbage collector and the process lifetime are the interpreter's own:
# nothing to check, so this instrumentor always loads.
_instruments: tuple[str, ...] = ()
