#!/bin/sh
# Print the project's version: the one place it is written is xencbt_core.__version__.
exec sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$(dirname "$0")/../plugin/xencbt_core/__init__.py"
