# The batch job a runner submits for one build (the "nomad" launcher).
#
# Placeholders are HCL2 input variables: every `var.*` below is filled in at
# submission, so the file is both the reference shape of the job and a working
# template. Try it by hand with
#
#   nomad var put nomad/jobs/conveyor-build-b123 EXAMPLE_SECRET=s3cret
#   nomad job run -var build_id=b123 \
#     -var script_b64="$(printf 'echo hello from $CONVEYOR_BUILD_ID\n' | base64 -w0)" \
#     deploy/nomad/build-job.nomad.hcl
#
# The runner produces the same job (POST /v1/jobs/parse with these variables,
# or the equivalent JSON built directly) and then:
#   - writes the build's secrets to the Nomad Variable
#     nomad/jobs/conveyor-build-<build_id> *before* submitting (the job's
#     workload identity can read exactly that path, nothing else);
#   - follows allocation/task events and reads the task's stdout/stderr with
#     the client fs logs API;
#   - on cancel or deadline deregisters the job (Nomad sends SIGTERM, then
#     SIGKILL after kill_timeout = the grace period);
#   - after the build ends, deletes the Variable and purges the job.
#
# HCL2 cannot interpolate block labels, so the label below is fixed and the
# job ID comes from the `id` attribute.

variable "build_id" {
  type        = string
  description = "Build id; the job is conveyor-build-<build_id>."
}

variable "script_b64" {
  type        = string
  description = "The complete build script (runner.script), base64-encoded. Encoding keeps the script out of both HCL and Go-template parsing: the template only decodes it."
}

variable "env_b64" {
  type        = string
  description = "Non-secret environment as a base64-encoded env file: one KEY=<JSON-quoted value> per line."
  default     = ""
}

variable "image" {
  type        = string
  description = "Build image; it must provide bash and git."
  default     = "debian:12-slim"
}

variable "network_mode" {
  type        = string
  description = "Docker network mode; \"none\" for builds without network access."
  default     = "bridge"
}

variable "cpu_mhz" {
  type    = number
  default = 1000
}

variable "memory_mb" {
  type    = number
  default = 2048
}

variable "disk_mb" {
  type    = number
  default = 4096
}

variable "grace_seconds" {
  type        = number
  description = "Time between SIGTERM and SIGKILL when the build is stopped."
  default     = 30
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "priority" {
  type    = number
  default = 50
}

job "conveyor-build" {
  id          = "conveyor-build-${var.build_id}"
  name        = "conveyor-build-${var.build_id}"
  type        = "batch"
  datacenters = var.datacenters
  priority    = var.priority

  meta {
    conveyor_build_id = var.build_id
  }

  # Builds run on build nodes only (the same opt-in as the runner job).
  constraint {
    attribute = "${meta.conveyor_build_node}"
    value     = "true"
  }

  group "build" {
    count = 1

    # A build runs exactly once. Retrying is a user decision (a new build),
    # never something Nomad does behind the control plane's back.
    restart {
      attempts = 0
      mode     = "fail"
    }

    reschedule {
      attempts  = 0
      unlimited = false
    }

    ephemeral_disk {
      size = var.disk_mb
    }

    task "build" {
      driver = "docker"

      config {
        image        = var.image
        command      = "bash"
        args         = ["local/build.sh"]
        network_mode = var.network_mode
      }

      # The exec / raw_exec drivers take the same task with
      #   config { command = "bash"  args = ["local/build.sh"] }
      # and no image; the runner picks the driver from its configuration.

      env {
        CONVEYOR_BUILD_ID = var.build_id
      }

      template {
        destination = "local/build.sh"
        perms       = "0755"
        change_mode = "noop"
        data        = "{{ base64Decode \"${var.script_b64}\" }}"
      }

      template {
        destination = "local/build.env"
        env         = true
        change_mode = "noop"
        data        = "{{ base64Decode \"${var.env_b64}\" }}"
      }

      # Secrets: rendered from the build's Nomad Variable straight into the
      # task environment, never stored in the job spec. A build without
      # secrets has no Variable; the guard keeps the template from waiting.
      template {
        destination = "secrets/env"
        env         = true
        change_mode = "noop"
        data        = <<-EOT
        {{- if nomadVarExists "nomad/jobs/conveyor-build-${var.build_id}" }}
        {{- with nomadVar "nomad/jobs/conveyor-build-${var.build_id}" }}
        {{- range .Tuples }}
        {{ .K }}={{ .V | toJSON }}
        {{- end }}
        {{- end }}
        {{- end }}
        EOT
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "${var.grace_seconds}s"

      resources {
        cpu    = var.cpu_mhz
        memory = var.memory_mb
      }

      logs {
        max_files     = 2
        max_file_size = 50
      }
    }
  }
}
