"""Deployment: the calibrated model as it would ship, executing integer arithmetic, and its profile.

Fake quantization (``QuantizedActivations.active``) only *simulates* 8-bit arithmetic in float;
it is neither faster nor smaller. This module turns a calibrated model into a deployable
artifact whose matrix multiplications run on integer kernels, with **our** calibrated scales.

ONNX Runtime engine (``profile.engine=onnxruntime``, the default)
    The engine is built from the model's :class:`~transquant.quant.state.QuantState` (what
    ``quantize_`` returned): its activation grids and PEG groups, its weights' integer codes.

    1. The quantized-weight model is exported to ONNX (opset 17, eager attention: the sdpa export
       leaves Where/IsNaN nodes and runs slower in ORT), with the inputs its ``forward`` names
       (no ``token_type_ids`` for DistilBERT or OPT).
    2. Every activation site is mapped to its ONNX tensor *by value*: the site tensors are
       captured from PyTorch (the same taps calibration uses) and compared with every
       intermediate tensor of the exported graph on a padded sample batch (a tensor holding the
       tokens flattened to [batch * tokens, channels], as OPT's FFN does, matches too). No
       node-name heuristics, and the mapping is a check that the export computes the same
       function.
    3. QuantizeLinear→DequantizeLinear pairs carrying the state's grid (scale, zero point) are
       inserted at every quantized site: uint8 up to 8 bits, uint16 (``com.microsoft`` domain)
       for ``mixed``'s 16-bit sites, with Max/Min clipping in front for grids narrower than
       their container and per-channel scales for per-embedding-group sites. Every consumer
       reads the dequantized tensor — the residual path too, exactly as the fake-quant hooks
       replace a module output — except for a site on a module's *input*: there only the
       module's readers do (GPT-2's and OPT's post-attention sum is the FFN norm's input; the
       stream carried to the block's second add stays float, as in the fake-quant model). So the
       engine is W8A{8,16} where the method is.
    4. Weights on a <= 8-bit grid are stored as the state's integer codes (not re-quantized
       from float) in 8-bit initializers feeding DequantizeLinear. Each weight's initializer is
       the one under the parameter's name where the exporter kept it (tables, Gemm and Conv1D
       weights), else the one with its value (MatMul weights folded to [in, out]); either way it
       must hold the state's dequantized weight, as stored or transposed, or the build fails
       naming the module. Embedding tables are gathered as int8 and dequantized after the
       Gather, so the word embeddings (about half of MiniLM's parameters) are 8-bit in the file
       too.
    5. :func:`.fusions.fuse_for_cpu` writes ``MatMulIntegerToFloat`` (integer GEMM with the bias in its
       epilogue) for every weight MatMul with an 8-bit input (the pooler's and classifier's
       ``Gemm`` are rewritten as MatMuls first) and folds the attention scaling into the
       scores' grid, so ORT's optimizer turns ``q·kᵀ`` and ``probs·v`` into ``QLinearMatMul``
       (uint8 in and out). A weight MatMul with a 16-bit input (``mixed_paper``'s FFN input)
       becomes two integer GEMMs on the codes' high and low bytes (exact int32 sums, added in
       float). What stays float is the elementwise glue (LayerNorm, GELU, softmax, residual
       adds, the Quantize passes) and products with a float input or of two 16-bit tensors.
    6. :mod:`.verify` then counts integer and float MatMuls in the graph ORT's
       optimizer produces (a weight MatMul with two 8-bit inputs left float fails the build)
       and compares the engine's integer codes at every site with the fake-quant model's on
       the sample batch (below 99.9 % equal fails the build).

    The CPU this was measured on reports ``avx2 fma`` and no AVX-512/VNNI in /proc/cpuinfo.
    There MLAS runs U8S8 GEMMs with ``vpmaddubsw``, which adds *pairs* of u8·s8 products in
    saturating int16: an adversarial matrix (activations near 255, weights ±127) comes out 46 %
    wrong. ``weight_storage="u8"`` stores the same integers shifted by 128 (zero point 128) and
    runs U8U8 kernels that widen to 16 bits first — exact, but ~30 % slower per GEMM (1 thread:
    fp32 47, U8U8 70, U8S8 91 GMAC/s). On MiniLM's real activations the U8S8 engine produced the
    same integer codes at every site as the U8U8 one, so ``s8`` is the default (``profile.
    weight_storage``); ORT's own dynamic INT8 (the peer) uses U8S8 as well. On VNNI hardware
    (``vpdpbusd`` accumulates in int32) the question does not arise. S8S8 is exact but ORT
    has no fast kernel for it here (3x slower than fp32).
    The ``.onnx`` file is the deployable artifact and its bytes are the reported size.

    PEG (per-embedding-group ranges) is exact here: groups are per-channel scales, written as
    elementwise ``(clip(round(x/s_c) + z_c, 0, qmax) - z_c) * s_c`` (ORT's per-axis
    QuantizeLinear on the last axis was ~3x slower for the whole model); K=1 (one range for all
    channels) is an ordinary per-tensor QDQ. Where a PEG tensor feeds a MatMul (the FFN input),
    per-channel activation scales cannot be folded into one integer GEMM (the scale varies
    along the *reduction* axis), so the MatMul is split per group: the channels of a group are
    gathered, quantized with the group's scalar grid and multiplied by the matching weight rows
    on an integer kernel, and the K partial products are summed in float — the paper's
    proposal, executed.

PyTorch engine (``profile.engine=torch``)
    ``torch.ao`` dynamic INT8 Linear layers with our int8 weights (exact grid) and per-row 8-bit
    embedding tables. PyTorch has no maintained static-activation INT8 path for transformers
    (``torch.ao`` is deprecated), so activations are quantized per batch by the kernel itself,
    *not* with our calibrated grids: its accuracy is that of dynamic quantization, not of the
    calibrated method. It is kept for comparison. ONNX Runtime is the default because it
    executes our calibrated grids (fidelity to the fake-quant model is the point of the study)
    and its integer GEMMs were faster than PyTorch's on this CPU (numbers in the final report
    of issue 5 / ``profile.json`` of each run).

``profile.engine=none`` times the fake-quantized float model itself (a simulation, no gain).

Engines are registered in :data:`transquant.deploy.engines.ENGINES`: a new one is an
:class:`~transquant.deploy.engines.EngineKind` subclass with the packages it needs and a ``build`` method.

Modules, in the order a build uses them:

- :mod:`.runtime`: inputs, ONNX Runtime sessions, the :class:`~.runtime.Engine` handle, timing runners
- :mod:`.export`: ONNX export of a model (and ``Gemm`` rewritten as ``MatMul``)
- :mod:`.site_map`: each activation site's tensor in the exported graph, found by value
- :mod:`.qdq`: QuantizeLinear/DequantizeLinear insertion (activations, int8 weights, PEG splits)
- :mod:`.fusions`: exact rewrites ORT's optimizer does not do (integer GEMMs with bias, scores)
- :mod:`.verify`: integer-kernel counts and code agreement with the fake-quant model
- :mod:`.build`: the ONNX Runtime INT8 build composed of the above
- :mod:`.engines`: the ``profile.engine`` registry and its engines (plus ORT's dynamic INT8 peer)
- :mod:`.timing`, :mod:`.memory`, :mod:`.profiling`: the pipeline's profile stage
- :mod:`.cpu`: the CPU's flags, its load and the machine-wide timing lock
- :mod:`.op_profile`: ONNX Runtime's profiler on the engine, per op type
- :mod:`.peak`: peak GEMM throughput of this machine (integer and float)
- :mod:`.bench`: the profile stage at BERT-base size with random weights (or ``peak=true``)
"""
