"""The ``costmesh`` command line."""
