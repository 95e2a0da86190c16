"""The embedded default: AWS emulator, GitHub stand-in, IMDS stand-in and instance simulator."""
