"""What the tests and the benchmarks both need to run the services: tiny random models
(`tiny`), the three services in this process on loopback ports (`inprocess`) or as real processes
(`processes`), probes of running services (`probes`), a network-delay proxy (`netem`) and the ghz
runner (`ghz`). Nothing here is imported by the services; the images do not ship it.
"""
