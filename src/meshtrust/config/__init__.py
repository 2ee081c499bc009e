"""The one config layer: a line-aware YAML loader, shared validators, settings files.

Every file meshtrust reads (mesh.yaml, sidecar.yaml, agent and CA ``--config``, policies) is
read by :func:`load_yaml_documents` / :func:`load_yaml_mapping` and checked with the
validators here; every problem is a :class:`~meshtrust.errors.ConfigError` naming file, line
and field path (``mesh.yaml:12: services[1].upstreams[0].localPort: expected a port ...``).
"""

from meshtrust.config.documents import LineMap, LineSeq, YamlError, YamlLimits, line_for
from meshtrust.config.settings import (
    Converter,
    as_address,
    as_duration,
    as_float,
    as_int,
    as_names,
    as_path,
    as_str,
    as_trust_domain,
    load_settings,
)
from meshtrust.config.validators import (
    check_directory_location,
    check_dns_label,
    check_dns_subdomain,
    check_duration,
    check_float,
    check_host_port,
    check_int,
    check_labels,
    check_path,
    check_port,
    check_spiffe_id,
    check_string,
    check_string_list,
    check_trust_domain,
    describe,
    parse_host_port,
)
from meshtrust.config.yaml import load_yaml_documents, load_yaml_mapping, parse_yaml_documents
from meshtrust.errors import ConfigError

__all__ = [
    "ConfigError",
    "Converter",
    "LineMap",
    "LineSeq",
    "YamlError",
    "YamlLimits",
    "as_address",
    "as_duration",
    "as_float",
    "as_int",
    "as_names",
    "as_path",
    "as_str",
    "as_trust_domain",
    "check_directory_location",
    "check_dns_label",
    "check_dns_subdomain",
    "check_duration",
    "check_float",
    "check_host_port",
    "check_int",
    "check_labels",
    "check_path",
    "check_port",
    "check_spiffe_id",
    "check_string",
    "check_string_list",
    "check_trust_domain",
    "describe",
    "line_for",
    "load_settings",
    "load_yaml_documents",
    "load_yaml_mapping",
    "parse_host_port",
    "parse_yaml_documents",
]
