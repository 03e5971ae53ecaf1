# Nomad agent configuration every build node needs (merge it into the
# client's configuration, e.g. /etc/nomad.d/conveyor-build-node.hcl, and
# restart the agent). Build nodes run the runner system job
# (conveyor-runner.nomad.hcl) and the build jobs it submits.

client {
  enabled = true

  # The runner job and every build job are constrained to this meta key.
  meta {
    conveyor_build_node = "true"
  }

  # Nomad caps every task's kill_timeout at this (default "30s"). The runner
  # needs kill_timeout = "25m" to drain running builds on SIGTERM; with the
  # default it would be SIGKILLed after 30 s and its builds lost. Build jobs
  # use CONVEYOR_NOMAD_KILL_TIMEOUT (10 s by default), also capped here.
  max_kill_timeout = "30m"
}

# The runner runs as a host process.
plugin "raw_exec" {
  config {
    enabled = true
  }
}

# Builds from a local repository path bind-mount it read-only into the build
# container, which the docker driver refuses unless volumes are enabled.
plugin "docker" {
  config {
    volumes {
      enabled = true
    }
  }
}
