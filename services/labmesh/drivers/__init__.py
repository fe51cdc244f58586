"""Instrument drivers, one module per family. VISA/SCPI: Thorlabs PM100 power meters
(`powermeter`), generic SCPI instruments from a parameter map (`scpi`, example maps in `maps/`),
their shared VISA plumbing (`visa`) and pyvisa-sim definitions (`sim/`). NI-DAQmx cards
(`nidaq`) and motion stages (`motor`)."""
