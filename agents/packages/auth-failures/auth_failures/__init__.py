"""auth-failures: finds brute-force login attempts in device logs. Detection is in `detector`."""
