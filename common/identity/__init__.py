"""Identity: certificates and node keys for deployment, signing of published models."""
