# Conveyor runner agent: one per build node, launching builds as Nomad batch
# jobs (deploy/nomad/build-job.nomad.hcl) through the local Nomad agent.
#
# Build nodes need the client settings in build-node.client.hcl: the meta
# key conveyor_build_node = "true" (the constraint below), raw_exec, and a
# max_kill_timeout of at least this job's kill_timeout (25m), since Nomad's
# default of 30s would SIGKILL a draining runner after 30 seconds.
#
# raw_exec is used because the runner is a host process: it runs the
# `conveyor` binary installed on the node and talks to the Nomad agent on the
# node's own HTTP API; it needs no container.
#
# The runner needs a Nomad ACL token that may submit, read, signal and stop
# the build jobs and write their Variables: conveyor-runner.policy.hcl.
#
#   nomad acl policy apply conveyor-runner deploy/nomad/conveyor-runner.policy.hcl
#   nomad acl token create -name conveyor-runner -policy conveyor-runner
#   nomad var put nomad/jobs/conveyor-runner \
#     runner_token=<CONVEYOR_RUNNER_TOKEN of the control plane> nomad_token=<secret id>
#
#   nomad job run deploy/nomad/conveyor-runner.nomad.hcl
#
# Runners find the control-plane replicas through the conveyor-grpc service
# that conveyor-control.nomad.hcl registers: a template writes every
# instance's address to a file (CONVEYOR_CONTROL_ADDR_FILE) and keeps it
# current. The runner holds one replica's stream; when that replica goes
# away it reads the file again and moves to another that answers, without
# a restart and without waiting for a load balancer's health check.

variable "control_service" {
  type        = string
  description = "Service name of the control plane's gRPC port (conveyor-control.nomad.hcl registers conveyor-grpc)."
  default     = "conveyor-grpc"
}

variable "service_provider" {
  type        = string
  description = "Where that service is registered: \"nomad\" (native service discovery) or \"consul\"; as in conveyor-control.nomad.hcl."
  default     = "nomad"
}

variable "control_addr" {
  type        = string
  description = "Optional HOST:PORT list (commas) used while the service lists no replica, e.g. a load balancer or a DNS name with one record per replica."
  default     = ""
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "conveyor_bin" {
  type        = string
  description = "Path of the conveyor executable on every build node."
  default     = "/opt/conveyor/venv/bin/conveyor"
}

variable "capacity" {
  type        = number
  description = "Builds one runner may have running at once."
  default     = 4
}

variable "metrics_port" {
  type    = number
  default = 9470
}

variable "build_driver" {
  type        = string
  description = "Driver of the build jobs: docker, exec or raw_exec."
  default     = "docker"
}

variable "build_image" {
  type        = string
  description = "Image of the build jobs (docker driver); it must provide bash and git."
  default     = "buildpack-deps:bookworm-scm"
}

variable "build_datacenters" {
  type        = string
  description = "Comma-separated datacenters the build jobs may run in."
  default     = "*"
}

variable "build_kill_timeout_seconds" {
  type        = number
  description = "Grace between SIGTERM and SIGKILL when a build is stopped."
  default     = 10
}

variable "nomad_addr" {
  type        = string
  description = "The local Nomad agent's HTTP API (https://... when the cluster uses TLS)."
  default     = "http://127.0.0.1:4646"
}

locals {
  # One HOST:PORT a line, every registered replica of the control plane.
  control_addresses_nomad  = "{{- range nomadService \"${var.control_service}\" }}{{ .Address }}:{{ .Port }}\n{{ end -}}"
  control_addresses_consul = "{{- range service \"${var.control_service}\" }}{{ .Address }}:{{ .Port }}\n{{ end -}}"
}

job "conveyor-runner" {
  type        = "system"
  datacenters = var.datacenters

  constraint {
    attribute = "${meta.conveyor_build_node}"
    value     = "true"
  }

  # A system job honours only max_parallel and stagger here (Nomad's update
  # block docs); health settings such as min_healthy_time would be ignored.
  update {
    # One node at a time: each runner drains for up to kill_timeout.
    max_parallel = 1
    stagger      = "30s"
  }

  group "runner" {
    network {
      port "metrics" {
        static = var.metrics_port
      }
    }

    service {
      provider = "nomad"
      name     = "conveyor-runner"
      port     = "metrics"
      tags     = ["conveyor", "runner", "metrics"]

      check {
        name     = "healthz"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "3s"
      }
    }

    restart {
      attempts = 10
      interval = "30m"
      delay    = "15s"
      mode     = "delay"
    }

    task "runner" {
      driver = "raw_exec"

      config {
        command = var.conveyor_bin
        args    = ["runner", "start"]
      }

      env {
        CONVEYOR_CONTROL_ADDR_FILE   = "${NOMAD_TASK_DIR}/control-addresses"
        CONVEYOR_CONTROL_ADDR        = var.control_addr
        CONVEYOR_LAUNCHER            = "nomad"
        CONVEYOR_RUNNER_CAPACITY     = "${var.capacity}"
        CONVEYOR_WORK_DIR            = "${NOMAD_TASK_DIR}/work"
        CONVEYOR_RUNNER_METRICS_ADDR = "0.0.0.0:${NOMAD_PORT_metrics}"
        # Every runner label k=v becomes the build-job constraint
        # ${meta.k} = v, so labels must be node meta: this one keeps builds on
        # build nodes.
        CONVEYOR_RUNNER_LABELS = "conveyor_build_node=true"
        NOMAD_ADDR             = var.nomad_addr
        # What every build job looks like (see build-job.nomad.hcl):
        CONVEYOR_NOMAD_DRIVER       = var.build_driver
        CONVEYOR_NOMAD_IMAGE        = var.build_image
        CONVEYOR_NOMAD_DATACENTERS  = var.build_datacenters
        CONVEYOR_NOMAD_KILL_TIMEOUT = "${var.build_kill_timeout_seconds}"
        # On a TLS-enabled cluster also set NOMAD_CACERT, NOMAD_CLIENT_CERT and
        # NOMAD_CLIENT_KEY (host paths), and CONVEYOR_TLS_CA when the control
        # plane serves TLS. NOMAD_NAMESPACE / NOMAD_REGION pick where the build
        # jobs go.
      }

      # The control-plane replicas. Re-rendered when they change; the runner
      # reads it again whenever the replica in use stops answering, so no
      # restart (which would drain running builds) is needed.
      template {
        destination = "local/control-addresses"
        change_mode = "noop"
        data        = var.service_provider == "consul" ? local.control_addresses_consul : local.control_addresses_nomad
      }

      template {
        destination = "secrets/runner.env"
        env         = true
        # A changed token must not cut running builds short: the runner
        # picks the new value up on its next (drained) restart.
        change_mode = "noop"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/conveyor-runner" }}
        CONVEYOR_RUNNER_TOKEN={{ .runner_token.Value | toUnescapedJSON }}
        NOMAD_TOKEN={{ .nomad_token.Value | toUnescapedJSON }}
        {{- end }}
        EOT
      }

      # SIGTERM starts a drain: running builds finish or are handed back.
      # 25 minutes covers the default 20-minute build deadline plus the hand
      # back. Nomad caps it at the client's max_kill_timeout, "30s" unless
      # raised: build nodes must set it (build-node.client.hcl).
      kill_signal  = "SIGTERM"
      kill_timeout = "25m"

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
