"""Device models behind the vhost-user back-end."""
