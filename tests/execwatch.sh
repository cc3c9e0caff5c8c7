#!/bin/sh
# execwatch.sh CMD [ARGS...]: run CMD under strace, recording every execve of it and of its
# descendants (argv and environment) to a new file in $SECRETWATCH_EXECS, for the secret
# watch (tests/secretwatch.py).  --seccomp-bpf stops the tracees only at execve (cheap);
# -DDD makes strace a detached grandchild, so CMD keeps this process's pid (signals and
# Popen work as without it).  Without SECRETWATCH_EXECS, CMD runs untraced.
[ -n "${SECRETWATCH_EXECS:-}" ] || exec "$@"
log=$(mktemp "$SECRETWATCH_EXECS/exec.XXXXXXXX") || exit 125
exec strace -DDD -f --seccomp-bpf -qq -v -s 1048576 -e trace=execve,execveat -e signal=none \
    -o "$log" -- "$@"
