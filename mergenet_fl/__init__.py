"""mergenet-fl core: MergeNet's low-rank knowledge transfer, in torch and numpy only.

Client side: :func:`select_layers`, :func:`export_packet`, :func:`install_merged`,
:func:`gradient_pieces`. Server side: :class:`KnowledgeBank`, :class:`Hypernetwork`.
The Flower side (strategies, client helpers) is the subpackage :mod:`mergenet_fl.flower`,
which needs ``flwr``; importing this package alone never imports it.
"""

from mergenet_fl.adapter import LPKA, VARIANTS, AdapterConfig, SourceTokens
from mergenet_fl.bank import BankEntry, KnowledgeBank
from mergenet_fl.client import InstalledLayer, export_packet, gradient_pieces, install_merged
from mergenet_fl.hypernet import Generation, HypernetConfig, Hypernetwork
from mergenet_fl.lowrank import (
    align_signs,
    energy_rank,
    factorize,
    factorize_energy,
    factorize_product,
    pad_rank,
    reconstruct,
)
from mergenet_fl.packet import (
    FactorPair,
    KnowledgePacket,
    LayerFactors,
    PacketError,
    decode_factors,
    encode_factors,
)
from mergenet_fl.selection import (
    LayerSpec,
    SelectedLayer,
    SelectionError,
    as_spec,
    describe_selection,
    select_layers,
)

__all__ = [
    "LPKA",
    "VARIANTS",
    "AdapterConfig",
    "BankEntry",
    "FactorPair",
    "Generation",
    "HypernetConfig",
    "Hypernetwork",
    "InstalledLayer",
    "KnowledgeBank",
    "KnowledgePacket",
    "LayerFactors",
    "LayerSpec",
    "PacketError",
    "SelectedLayer",
    "SelectionError",
    "SourceTokens",
    "align_signs",
    "as_spec",
    "decode_factors",
    "describe_selection",
    "encode_factors",
    "export_packet",
    "energy_rank",
    "factorize",
    "factorize_energy",
    "factorize_product",
    "gradient_pieces",
    "install_merged",
    "pad_rank",
    "reconstruct",
    "select_layers",
]
