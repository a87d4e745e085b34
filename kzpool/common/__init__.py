"""What every kzpool process uses: the wire format, settings and config, errors, URIs."""
