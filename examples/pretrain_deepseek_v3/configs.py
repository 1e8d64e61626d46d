"""Model and training presets for ``pretrain.py --config NAME``: Megatron-LM flags.

Flags given on the command line override the preset (argparse keeps the last value). Every preset
uses ``--moe-token-dispatcher-type deepep``; pass ``--moe-token-dispatcher-type alltoall`` to compare
with megatron-core's dispatcher.
"""

from __future__ import annotations

import shlex

# DeepSeek-V3's MoE recipe, shared by every preset: MLA, sigmoid scores, group-limited top-k,
# aux-loss-free balancing (expert bias) plus a small sequence aux loss, fp32 router, shared expert
# (overlapped with dispatch/combine), SwiGLU, RMSNorm, BF16.
DEEPSEEK_V3_STYLE = """
    --multi-latent-attention
    --moe-router-score-function sigmoid --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
    --moe-router-dtype fp32 --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4
    --moe-token-dispatcher-type deepep --moe-shared-expert-overlap
    --swiglu --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights
    --position-embedding-type rope --attention-dropout 0.0 --hidden-dropout 0.0 --bf16
    --tokenizer-type NullTokenizer
    --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
    --lr-decay-style cosine --init-method-std 0.02 --seed 1234 --log-interval 1
    --wandb-project deepep-megatron
"""

# Kernel fusions that need apex / Transformer Engine / CUDA: use the plain torch implementations.
UNFUSED = """
    --no-bias-swiglu-fusion --no-bias-dropout-fusion --no-rope-fusion --no-masked-softmax-fusion
    --no-gradient-accumulation-fusion --no-persist-layer-norm
"""

# A laptop-CPU run: 4 gloo ranks, EP=4, 3 layers (1 dense + 2 MoE), 16 experts top-4 in 4 groups
# (2 kept), MLA; 0.8 M parameters per rank, about 0.2-0.4 s per step on 2 cores.
TINY = """
    --num-layers 3 --moe-layer-freq [0]*1+[1]*2
    --hidden-size 128 --ffn-hidden-size 384 --num-attention-heads 4
    --q-lora-rank 64 --kv-lora-rank 32 --qk-head-dim 32 --qk-pos-emb-head-dim 16 --v-head-dim 32
    --num-experts 16 --moe-ffn-hidden-size 64 --moe-shared-expert-intermediate-size 64
    --moe-router-topk 4 --moe-router-num-groups 4 --moe-router-group-topk 2
    --moe-router-topk-scaling-factor 2.5
    --expert-model-parallel-size 4
    --seq-length 128 --max-position-embeddings 128 --micro-batch-size 2
    --global-batch-size 8 --vocab-size 1024
    --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 4 --train-iters 60
    --distributed-backend gloo --use-cpu-initialization
    --wandb-exp-name tiny
"""

# DeepSeek-V3 proxy: 14 layers (first 3 dense), 64 experts top-8 in 8 groups (4 kept), MLA, hidden
# scaled to 1024 so that one GPU holds it at EP=1 (one process) or EP=4 (four processes under MPS).
PROXY = """
    --num-layers 14 --moe-layer-freq [0]*3+[1]*11
    --hidden-size 1024 --ffn-hidden-size 2816 --num-attention-heads 16
    --q-lora-rank 384 --kv-lora-rank 128 --qk-head-dim 64 --qk-pos-emb-head-dim 32 --v-head-dim 64
    --num-experts 64 --moe-ffn-hidden-size 256 --moe-shared-expert-intermediate-size 256
    --moe-router-topk 8 --moe-router-num-groups 8 --moe-router-group-topk 4
    --moe-router-topk-scaling-factor 2.5
    --expert-model-parallel-size 1
    --seq-length 2048 --max-position-embeddings 2048 --micro-batch-size 2
    --global-batch-size 8 --vocab-size 32768
    --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 20 --train-iters 200
    --wandb-exp-name proxy
"""

# The published DeepSeek-V3 671B architecture (Megatron-LM's DeepSeek-V3 example), for clusters (EP
# across nodes, PP, Transformer Engine). This example's compact loop has no pipeline parallelism:
# run these flags with Megatron-LM's pretrain_gpt.py through `python -m deepep_megatron.megatron.run`.
FULL = """
    --num-layers 61 --moe-layer-freq [0]*3+[1]*58
    --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 128
    --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128
    --num-experts 256 --moe-ffn-hidden-size 2048 --moe-shared-expert-intermediate-size 2048
    --moe-router-topk 8 --moe-router-num-groups 8 --moe-router-group-topk 4
    --moe-router-topk-scaling-factor 2.5
    --moe-grouped-gemm --mtp-num-layers 1
    --seq-length 4096 --max-position-embeddings 4096
    --expert-model-parallel-size 64 --pipeline-model-parallel-size 16
    --micro-batch-size 1 --global-batch-size 15360 --vocab-size 129280
    --lr 2.2e-4 --min-lr 2.2e-5 --lr-warmup-iters 2000 --train-iters 500000
    --wandb-exp-name deepseek-v3-671b
"""

CONFIGS: dict[str, list[str]] = {
    "tiny": shlex.split(DEEPSEEK_V3_STYLE + UNFUSED + TINY),
    "proxy": shlex.split(DEEPSEEK_V3_STYLE + UNFUSED + PROXY),
    "full": shlex.split(DEEPSEEK_V3_STYLE + FULL),
}
