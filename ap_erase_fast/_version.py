"""The package version, in a module of its own so that every module can import it without
importing the package root (which lazily imports the api, the config and the engine)."""
__version__ = "0.1.0"
