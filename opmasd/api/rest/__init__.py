"""REST, transcoded from the proto's google.api.http rules: routes, transcoding, the HTTP server."""
