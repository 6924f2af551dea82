"""device-liveness: notices devices that stop sending logs. Detection is in `tracker`."""
