"""sd-operator: run Stable Diffusion on Kubernetes (operator, services layer and tooling)."""

from importlib.metadata import PackageNotFoundError, version

API_GROUP = "sd-operator.dev"
API_VERSION = "v1alpha1"

try:
    __version__ = version("sd-operator")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
