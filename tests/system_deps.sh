#!/usr/bin/env bash
# Installs the Debian packages the SLURM and multi-node tests start for real (no systemd):
# slurm-wlm (slurmctld, slurmd, srun, sbatch), munge, openssh-server/-client, pdsh.
# Needs root; elsewhere, or when apt cannot install them, it says what is missing and exits 0:
# the suite still runs and those tests skip with that reason (tests/fixtures/slurm.py).
# Also installs the npm package s3rver, a second S3 implementation the S3 tests run against
# besides moto (tests/fixtures/s3.py), when npm is there.
set -uo pipefail
if ! command -v s3rver >/dev/null && command -v npm >/dev/null; then
  npm install -g --silent s3rver@3.7.1 >/dev/null 2>&1 \
    || echo "system_deps: npm could not install s3rver; its S3 tests will skip" >&2
fi
need=()
command -v slurmctld >/dev/null || [ -x /usr/sbin/slurmctld ] || need+=(slurm-wlm)
command -v munged >/dev/null || [ -x /usr/sbin/munged ] || need+=(munge)
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v pdsh >/dev/null || need+=(pdsh)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "system_deps: not root; install ${need[*]} for the SLURM/multi-node tests" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }; then
  echo "system_deps: apt-get could not install ${need[*]}; the SLURM/multi-node tests will skip" >&2
fi
exit 0
