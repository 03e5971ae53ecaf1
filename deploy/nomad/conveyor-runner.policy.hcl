# ACL policy for the Conveyor runner's Nomad token (CONVEYOR_LAUNCHER=nomad).
#
# Exactly what src/runner/launchers/nomad.py calls, with the capability each
# endpoint requires in Nomad's API docs (v1.6 to v1.9):
#
#   POST   /v1/jobs                               submit-job       register a build job
#   DELETE /v1/job/:id?purge=true                 submit-job       stop and purge it
#   GET    /v1/evaluation/:id                     read-job         placement result
#   GET    /v1/job/:id/allocations                read-job         find its allocation
#   GET    /v1/allocation/:id                     read-job         task state and events
#   GET    /v1/client/fs/logs/:alloc              read-logs        stdout and stderr
#   GET    /v1/client/fs/ls/:alloc?path=alloc/logs read-fs          where to resume a log
#                                                                  after rotation
#   POST   /v1/client/allocation/:alloc/signal    alloc-lifecycle  SIGKILL after a short grace
#   PUT    /v1/var/nomad/jobs/conveyor-build-*    variables write  the build's secrets
#   DELETE /v1/var/nomad/jobs/conveyor-build-*    variables destroy
#
# Without alloc-lifecycle the signal is refused (403) and a stop whose grace
# is shorter than the job's kill_timeout waits for Nomad's own SIGKILL.
# Without read-fs a log stream that breaks after logmon deleted a rotated file
# resumes too far on.
# Builds go to NOMAD_NAMESPACE: change "default" when you set it.
#
#   nomad acl policy apply -description "Conveyor runner" conveyor-runner deploy/nomad/conveyor-runner.policy.hcl
#   nomad acl token create -name conveyor-runner -policy conveyor-runner

namespace "default" {
  capabilities = ["submit-job", "read-job", "read-logs", "read-fs", "alloc-lifecycle"]

  variables {
    path "nomad/jobs/conveyor-build-*" {
      capabilities = ["write", "read", "destroy"]
    }
  }
}
