"""Protocol core benchmark: handshakes/s and sealed+opened data packets/s in one process."""
