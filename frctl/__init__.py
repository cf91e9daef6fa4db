"""frctl: the one command-line entry point of the project (a thin shell over the libraries)."""
