"""The Flower edge: message constants, the strategy bridge, simulation and simulated attackers."""
