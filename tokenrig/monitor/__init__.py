"""Live monitoring: Prometheus exporters, scrape-target discovery files and Grafana dashboards."""
