# The batch job a runner submits for one build (CONVEYOR_LAUNCHER=nomad).
#
# The runner builds this job as JSON in src/runner/launchers/nomad_job.py
# (build_job); this file is the same job written as HCL2, for reading,
# reviewing and trying by hand. Keep the two in step. Placeholders are HCL2
# input variables: every `var.*` is filled in at submission.
#
#   nomad var put nomad/jobs/conveyor-build-b123 EXAMPLE_SECRET=s3cret
#   nomad job run -var build_id=b123 \
#     -var script_b64="$(printf 'echo "hello from $NOMAD_JOB_ID"\n' | base64 -w0)" \
#     deploy/nomad/build-job.nomad.hcl
#
# What the runner does around the job:
#   - writes the build's secrets to the Nomad Variable
#     nomad/jobs/conveyor-build-<build_id> *before* submitting; the job's
#     workload identity can read exactly that path, and the values never enter
#     the job spec;
#   - follows allocation/task events and reads the task's stdout/stderr with
#     the client fs logs API;
#   - on cancel or deadline deregisters the job (Nomad sends SIGTERM, then
#     SIGKILL after kill_timeout, the grace period);
#   - when the build has ended, deletes the Variable and purges the job.
#
# Differences forced by HCL, with the same effect as the runner's JSON:
#   - the build script travels base64-encoded (script_b64) and the template
#     only decodes it, so neither HCL's ${...} nor the template engine's {{ }}
#     touch it (the runner's JSON carries it verbatim under template
#     delimiters derived from its digest);
#   - the plain environment travels as an env file (env_b64), because HCL
#     cannot fill an `env` block from a map variable (the JSON job sets Env);
#   - the secrets template is always present and guarded by nomadVarExists
#     (the runner adds it only when the build has secrets);
#   - HCL2 cannot interpolate block labels, so the job ID is set by `id`.
#
# Placement: every runner label k=v (CONVEYOR_RUNNER_LABELS) becomes a
# constraint ${meta.k} = v. The runner job in this directory sets
# conveyor_build_node=true, which is the constraint below.

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
  description = "Non-secret environment as a base64-encoded env file: one KEY=<JSON-quoted value> per line (no HTML escaping)."
  default     = ""
}

variable "image" {
  type        = string
  description = "Build image (CONVEYOR_NOMAD_IMAGE); it must provide bash and git."
  default     = "buildpack-deps:bookworm-scm"
}

variable "shell" {
  type        = string
  description = "Shell that runs the script (CONVEYOR_NOMAD_SHELL)."
  default     = "/bin/bash"
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

variable "max_processes" {
  type    = number
  default = 512
}

variable "grace_seconds" {
  type        = number
  description = "Time between SIGTERM and SIGKILL when the build is stopped (CONVEYOR_NOMAD_KILL_TIMEOUT)."
  default     = 10
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

  # From the runner's label conveyor_build_node=true: build nodes only.
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
        command      = var.shell
        args         = ["${NOMAD_TASK_DIR}/build.sh"]
        network_mode = var.network_mode
        pids_limit   = var.max_processes
        # tini as PID 1 forwards SIGTERM to the script; bash as PID 1 would
        # ignore it and every stop would wait for the SIGKILL.
        init = true
      }

      # The exec / raw_exec drivers (CONVEYOR_NOMAD_DRIVER) take
      #   config { command = var.shell  args = ["${NOMAD_TASK_DIR}/build.sh"] }
      # without the docker-only keys.

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
      # task environment, never stored in the job spec. toUnescapedJSON, not
      # toJSON: toJSON writes & < > as \u0026..., which Nomad's env-file
      # parser does not decode.
      template {
        destination = "secrets/env"
        env         = true
        # Deleting the Variable when the job ends must not restart the task.
        change_mode = "noop"
        data        = <<-EOT
        {{- if nomadVarExists "nomad/jobs/conveyor-build-${var.build_id}" }}
        {{- with nomadVar "nomad/jobs/conveyor-build-${var.build_id}" }}
        {{- range .Tuples }}
        {{ .K }}={{ .V | toUnescapedJSON }}
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
        max_files     = 10
        max_file_size = 20
      }
    }
  }
}
