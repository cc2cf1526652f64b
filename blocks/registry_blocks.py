"""The registries as Prefect blocks, for ``block://<block-type-slug>/<name>`` URLs.

``LocalRegistry`` and ``S3Registry`` are plain pydantic models, so the commands that need
no orchestration (``runbook history``, ``publish``, ``promote``, ``rollback --dry-run``)
never import Prefect (about a second, even compiled). The Prefect blocks are subclasses
defined here, with the same fields, the same block type slugs and the same schema
checksums as when the registries themselves were blocks: documents saved earlier load
unchanged, and the UI's Blocks page shows the same types. A loaded block *is* a registry
(``isinstance(block, S3Registry)``), so callers need not unwrap it.

Register the types with ``prefect block register -m blocks.registry_blocks``;
``blocks.registry.open_registry`` imports this module only for ``block://`` URLs.
"""

from __future__ import annotations

from typing import ClassVar

from prefect.blocks.core import Block
from pydantic import ConfigDict

from blocks.local import LocalRegistry
from blocks.registry import ModelRegistry
from blocks.s3 import S3Registry

# ``extra="allow"`` is Block's own setting (a block document's data may carry
# ``block_type_slug``); the title keeps the JSON schema, hence the schema checksum the
# server knows the type by, what it was when the registry classes were blocks.
_LOCAL_CONFIG = ConfigDict(extra="allow", title="LocalRegistry")
_S3_CONFIG = ConfigDict(extra="allow", title="S3Registry")


class LocalRegistryBlock(Block, LocalRegistry):
    """A ``LocalRegistry`` saved as a Prefect block (``block://local-model-registry/NAME``)."""

    model_config: ClassVar[ConfigDict] = _LOCAL_CONFIG

    _block_type_name = "Local Model Registry"
    _block_type_slug = "local-model-registry"
    _description = "Model versions, environment pointers and journal in a local folder."
    _code_example = """```python
from blocks.registry import open_registry

registry = open_registry("block://local-model-registry/BLOCK_NAME", "MODEL")
```"""


class S3RegistryBlock(Block, S3Registry):
    """An ``S3Registry`` saved as a Prefect block (``block://s3-model-registry/NAME``).

    ``credentials_secret`` names a Prefect Secret block, read when the first S3 request
    is made; the key fields are Prefect secret fields (shown as ``****``).
    """

    model_config: ClassVar[ConfigDict] = _S3_CONFIG

    _block_type_name = "S3 Model Registry"
    _block_type_slug = "s3-model-registry"
    _description = (
        "Model versions, environment pointers and journal under an S3 prefix; pointers move "
        "by conditional writes, integrity is checked from stored SHA-256 checksums."
    )
    _code_example = """```python
from blocks.registry import open_registry

registry = open_registry("block://s3-model-registry/BLOCK_NAME", "MODEL")
```"""


#: the block type of each plain registry type
_BLOCK_OF: dict[type[ModelRegistry], type[Block]] = {
    LocalRegistry: LocalRegistryBlock,
    S3Registry: S3RegistryBlock,
}


def as_block(registry: ModelRegistry) -> Block:
    """The Prefect block of ``registry`` (same field values), ready to ``.save(name)``."""
    if isinstance(registry, Block):
        return registry
    block_type = _BLOCK_OF.get(type(registry))
    if block_type is None:
        raise TypeError(f"{type(registry).__name__} has no Prefect block type")
    # field values as they are: secrets stay SecretStr, not '**********'
    return block_type(**{name: getattr(registry, name) for name in type(registry).model_fields})
