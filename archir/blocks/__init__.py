"""The block library. Importing this package registers every kind (one module per family).

Families: ``norm``, ``embed``, ``heads``, ``attention``, ``mlp`` (MLP, SwiGLU, GeGLU),
``moe``, ``recurrent`` (linear attention, GLA, RetNet, RWKV), ``ssm`` (Mamba, S4D),
``ssd`` (Mamba-2), ``deltanet`` (Gated DeltaNet), ``slstm`` (xLSTM's sLSTM),
``conv`` (Hyena, PoolFormer pooling, ConvFormer separable convolution, MLP-Mixer token MLP,
identity),
``mlstm`` (xLSTM's mLSTM),
``aaren`` (Attention as an RNN: a learned query over every prefix),
``vision`` (the downsampling layers of vision hierarchies: strided convolution, patch merging).
"""

from archir.blocks import (  # noqa: F401
    aaren,
    attention,
    conv,
    deltanet,
    embed,
    heads,
    mlp,
    mlstm,
    moe,
    norm,
    recurrent,
    slstm,
    ssd,
    ssm,
    vision,
)
