"""mm-producer: raw sensor files and live sources -> samples, into the ring or a disk cache."""
