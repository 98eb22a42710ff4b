"""The owner's data: consent and its enforcement, location, the data key, export and wipe."""
