"""Event producers: synthetic streams, file replay, rate control."""
