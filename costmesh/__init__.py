"""costmesh API package: generated stubs under ``costmesh.<svc>.v1`` and a small typed client (``costmesh.client``)."""
