# Conveyor control plane: ConfigService, SchedulerService, BuildManager and
# RunnerService on one gRPC port, webhooks/metrics/health on one HTTP port.
#
# Every replica is stateless beyond PostgreSQL (schedulers coordinate through
# the database), so the job runs several identical allocations spread over
# hosts. Before the first run, store the configuration in a Nomad Variable at
# the job's own path; the template below reads it through the job's workload
# identity, so no ACL policy is needed for it:
#
#   nomad var put nomad/jobs/conveyor-control \
#     database_url='postgresql://conveyor:...@db.internal:5432/conveyor?sslmode=verify-full' \
#     secret_key="$(head -c 32 /dev/urandom | base64)" \
#     admin_token="$(openssl rand -hex 32)" \
#     runner_token="$(openssl rand -hex 32)"
#
# Keep a copy of secret_key outside Nomad (see docs/operations.md, "Backups").
#
#   nomad job run -var image=registry.example.com/conveyor:0.1.0 \
#     -var public_url=https://conveyor.example.com deploy/nomad/conveyor-control.nomad.hcl

variable "image" {
  type        = string
  description = "Container image with the conveyor package installed and `conveyor` on PATH."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "replicas" {
  type        = number
  description = "Control-plane replicas. Two or more for availability; each holds its own database pool."
  default     = 3
}

variable "public_url" {
  type        = string
  description = "Base URL users reach the control plane at (links in statuses and notifications)."
  default     = "https://conveyor.example.com"
}

variable "service_provider" {
  type        = string
  description = "\"nomad\" (native service discovery, scraped by prometheus nomad_sd_configs) or \"consul\"."
  default     = "nomad"
}

job "conveyor-control" {
  type        = "service"
  datacenters = var.datacenters

  update {
    max_parallel      = 1
    canary            = 1
    auto_promote      = true
    auto_revert       = true
    health_check      = "checks"
    min_healthy_time  = "20s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
  }

  group "control" {
    count = var.replicas

    # One replica per host where possible, so a host failure takes at most
    # one with it. A spread rather than distinct_hosts: the canary of an
    # update would otherwise need a fourth eligible host.
    spread {
      attribute = "${node.unique.id}"
    }

    network {
      port "grpc" {
        to = 7070
      }
      port "http" {
        to = 8080
      }
    }

    # Deregister from discovery first, so load balancers stop sending new
    # requests before the process receives SIGTERM.
    shutdown_delay = "5s"

    service {
      provider = var.service_provider
      name     = "conveyor-http"
      port     = "http"
      tags     = ["conveyor", "control", "metrics"]

      # Ready means the database is reachable and migrations are current, so a
      # canary that cannot migrate never becomes healthy and is reverted. No
      # check_restart here: restarting every replica during a database
      # outage would not bring the database back.
      check {
        name     = "readyz"
        type     = "http"
        path     = "/readyz"
        interval = "10s"
        timeout  = "3s"
      }

      # Alive: a hung process is restarted.
      check {
        name     = "healthz"
        type     = "http"
        path     = "/healthz"
        interval = "10s"
        timeout  = "3s"

        check_restart {
          limit = 3
          grace = "60s"
        }
      }
    }

    # Runners list this service's instances (conveyor-runner.nomad.hcl) and
    # move to another replica when theirs goes away.
    service {
      provider = var.service_provider
      name     = "conveyor-grpc"
      port     = "grpc"
      tags     = ["conveyor", "control", "grpc"]

      # grpc.health.v1 is served on this port. Nomad's native provider checks
      # only http and tcp, so the grpc check needs Consul; on the native
      # provider it degrades to a tcp connect (readiness is still covered by
      # /readyz above). With TLS enabled and Consul, also set grpc_use_tls.
      check {
        name     = "grpc-health"
        type     = var.service_provider == "consul" ? "grpc" : "tcp"
        port     = "grpc"
        interval = "10s"
        timeout  = "3s"
      }
    }

    restart {
      attempts = 5
      interval = "10m"
      delay    = "10s"
      mode     = "delay"
    }

    task "control" {
      driver = "docker"

      config {
        image   = var.image
        command = "conveyor"
        args    = ["control", "serve"]
        ports   = ["grpc", "http"]
      }

      env {
        CONVEYOR_GRPC_ADDR       = "0.0.0.0:7070"
        CONVEYOR_HTTP_ADDR       = "0.0.0.0:8080"
        CONVEYOR_PUBLIC_URL      = var.public_url
        CONVEYOR_LOG_FORMAT      = "json"
        CONVEYOR_SECRET_KEY_FILE = "${NOMAD_SECRETS_DIR}/secret.key"
        # Optional TLS for both ports: render the files with two more
        # template blocks (for example from Nomad Variables) and set
        #   CONVEYOR_TLS_CERT = "${NOMAD_SECRETS_DIR}/tls.crt"
        #   CONVEYOR_TLS_KEY  = "${NOMAD_SECRETS_DIR}/tls.key"
        # The readyz check then needs protocol = "https".
        # The space the database may use (docs/operations.md "Disk space and
        # log quotas"): log batches are refused when less than
        # CONVEYOR_DISK_MIN_FREE (1GiB) of it is left, and per account:
        #   CONVEYOR_DATABASE_DISK_BUDGET = "200GiB"
        #   CONVEYOR_ACCOUNT_LOG_QUOTA    = "20GiB"
      }

      # Connection string and tokens from the Nomad Variable, as environment.
      # toUnescapedJSON quotes each value for Nomad's env-file parser (toJSON
      # would write & < > as \u0026..., which that parser does not decode).
      template {
        destination = "secrets/conveyor.env"
        env         = true
        change_mode = "restart"
        splay       = "30s"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/conveyor-control" }}
        CONVEYOR_DATABASE_URL={{ .database_url.Value | toUnescapedJSON }}
        CONVEYOR_ADMIN_TOKEN={{ .admin_token.Value | toUnescapedJSON }}
        CONVEYOR_RUNNER_TOKEN={{ .runner_token.Value | toUnescapedJSON }}
        {{- end }}
        EOT
      }

      # The secrets-at-rest key goes to a file rather than the environment so
      # that it never shows up in /proc/<pid>/environ or a crash dump of env.
      template {
        destination = "secrets/secret.key"
        perms       = "0400"
        change_mode = "restart"
        data        = <<-EOT
        {{- with nomadVar "nomad/jobs/conveyor-control" }}{{ .secret_key.Value }}{{ end }}
        EOT
      }

      # Let in-flight RPCs finish and streams close before SIGKILL.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      resources {
        cpu    = 1000
        memory = 512
      }

      logs {
        max_files     = 5
        max_file_size = 20
      }
    }
  }
}
