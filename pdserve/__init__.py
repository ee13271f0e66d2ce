"""pdserve's shared core: config, types, environment, engine host, cluster launcher, client, CLI."""
