from tfmem.cli import entry

entry()
