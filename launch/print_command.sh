# shellcheck shell=bash
# Sourced by the launchers: print_command ARGS... prints a command line that a shell reads
# back unchanged (what --dry-run shows).

# Prints one argument so that a shell reads it back unchanged: plain words as they are, others
# in single quotes; of --flag=VALUE and NAME=VALUE only the VALUE is quoted.
shell_quote() {
  local prefix='' value=$1
  if [[ $1 =~ ^(--?[A-Za-z][A-Za-z0-9_.-]*=|[A-Za-z_][A-Za-z0-9_]*=)(.*)$ ]]; then
    prefix=${BASH_REMATCH[1]}
    value=${BASH_REMATCH[2]}
  fi
  if [[ $value =~ ^[A-Za-z0-9_./:=@%+,-]+$ || ( -z $value && -n $prefix ) ]]; then
    printf '%s%s' "$prefix" "$value"
  else
    printf "%s'%s'" "$prefix" "${value//\'/\'\\\'\'}"
  fi
}

print_command() {
  local sep='' arg
  for arg in "$@"; do
    printf '%s' "$sep"
    shell_quote "$arg"
    sep=' '
  done
  printf '\n'
}
