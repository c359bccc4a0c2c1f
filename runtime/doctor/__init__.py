"""edge-doctor: checks an install the way it will be used."""
