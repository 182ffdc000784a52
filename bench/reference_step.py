"""Time one training step of the authors' TensorFlow code (not part of avi; never run in CI).

Run with a Python that has TensorFlow 2.21 + tf_keras + tensorflow-probability 0.25 (see
docs/reference.md, "Environment and regeneration", for the environment and the five
compatibility patches), pointing at the `src/` folder of a copy of their repository:

    TF_USE_LEGACY_KERAS=1 python bench/reference_step.py --davi-src /path/to/Deep_Attentive_VI/src

`bench/bench.py reference` starts it for you and times avi in the same run. Nothing of the
authors' code is copied here: it is imported from --davi-src. The model is built from the
flags of the OMNIGLOT command in their README (15 layers, 7.87 M parameters), compiled the
way their trainer compiles it (Keras, legacy Adamax, the three-output loss), and stepped with
`train_on_batch` (graph mode, as `fit` runs it). Prints one JSON line prefixed "REFERENCE ":
median wall seconds and process CPU seconds (all threads) per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# The OMNIGLOT command of the authors' README, as run.py's flag strings.
OMNIGLOT = dict(
    hparams="layer_latent_shape=[16,16,20],num_layers=15,num_proc_blocks=1,data_distribution=bernoulli",
    decoder_attention_hparams="key_dim=8,query_dim=8,use_layer_norm=True",
    encoder_attention_hparams="key_dim=8,query_dim=8,use_layer_norm=False",
    merge_encoder_hparams="use_nonlocal=True,nonlocop_hparams=[key_dim=8,query_dim=8]",
    merge_decoder_hparams="use_nonlocal=True,nonlocop_hparams=[key_dim=8,query_dim=8]",
    decoder_hparams="scale=[0,0],num_blocks=2,num_filters=32",
    encoder_hparams="scale=[0,0],num_blocks=2,num_filters=32",
    preproc_encoder_hparams="scale=[0,0,-2],num_nodes=2,num_blocks=3,num_filters=32",
    postproc_decoder_hparams="scale=[2,0,0],num_nodes=2,use_nonlocal=True,"
                             "nonlocop_hparams=[key_dim=8,query_dim=8],num_blocks=3,num_filters=32",
    posterior_hparams="log_scale_upper_bound=5,log_scale_low_bound=-5",
    prior_hparams="log_scale_upper_bound=5,log_scale_low_bound=-5",
    data_dist_hparams="",
)
IMAGE = {"shape": (28, 28, 1), "high": 1, "low": 0, "binary": True, "pad_size": 2}


def build(tf, flags):
    """run.py's hyper-parameter parsing, then DeepVAE(...), built by one eager call."""
    from layers import LAYER, DepthWiseAttention
    from model import DeepVAE
    from stat_tools import DISTRIBUTION

    hp = DeepVAE.get_default_hparams().update_config(flags["hparams"])
    net = DeepVAE.get_default_network_hparams
    dist = lambda kind, key: DISTRIBUTION[kind].get_default_hparams().update_config(flags[key])  # noqa: E731
    att = lambda key: (DepthWiseAttention.get_default_hparams().update_config(flags[key])  # noqa: E731
                       if flags[key] else None)
    model = DeepVAE(
        hparams=hp,
        data_dist_hparams=dist(hp.data_distribution, "data_dist_hparams"),
        preproc_encoder_hparams=net(hp).preproc_encoder.update_config(flags["preproc_encoder_hparams"]),
        postproc_decoder_hparams=net(hp).postproc_decoder.update_config(flags["postproc_decoder_hparams"]),
        encoder_hparams=net(hp).encoder.update_config(flags["encoder_hparams"]),
        merge_encoder_hparams=LAYER[hp.merge_encoder_type].get_default_hparams().update_config(
            flags["merge_encoder_hparams"]),
        decoder_hparams=net(hp).decoder.update_config(flags["decoder_hparams"]),
        merge_decoder_hparams=LAYER[hp.merge_decoder_type].get_default_hparams().update_config(
            flags["merge_decoder_hparams"]),
        posterior_hparams=dist(hp.posterior_type, "posterior_hparams"),
        prior_hparams=dist(hp.prior_type, "prior_hparams"),
        image_info=dict(IMAGE),
        decoder_attention_hparams=att("decoder_attention_hparams"),
        encoder_attention_hparams=att("encoder_attention_hparams"))
    side = IMAGE["shape"][0] + 2 * IMAGE["pad_size"]
    # Their weight norm reads its kernel eagerly when built, so build with one eager call.
    model.call(inputs=tf.zeros([2, side, side, 1]), training=False)
    model.built = True
    return model, side


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--davi-src", required=True, help="the src/ folder of the authors' repository (patched)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first traces the graph)")
    a = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.path.insert(0, os.path.abspath(a.davi_src))
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(a.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from util.trainer import OPTIMIZER

    tf.keras.utils.set_random_seed(0)
    model, side = build(tf, OMNIGLOT)
    # As util/trainer.py: legacy Adamax (lr 0.01, eps 1e-3), losses are the model's outputs.
    model.compile(optimizer=OPTIMIZER["adamax"](learning_rate=0.01, epsilon=1e-3),
                  loss=[lambda y1, y2: y2] * 3, loss_weights=[1.0, 1.0, 0.0])
    rng = np.random.default_rng(0)
    x = np.pad((rng.random((a.batch, 28, 28, 1)) < 0.3).astype(np.float32),
               [(0, 0), (2, 2), (2, 2), (0, 0)])
    y = [np.zeros(a.batch, np.float32)] * 3
    for _ in range(a.warmup):
        model.train_on_batch(x, y)
    times, cpu = [], []
    for _ in range(a.repeats):
        t, c = time.perf_counter(), time.process_time()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    with open("/proc/self/status") as f:
        peak = next((int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:")), None)
    print("REFERENCE " + json.dumps({"seconds": statistics.median(times), "times": times,
                                      "cpu_seconds": statistics.median(cpu), "cpu_times": cpu,
                                      "parameters": params, "peak_mb": peak, "tf": tf.__version__,
                                      "threads": a.threads, "batch": a.batch,
                                      "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}))


if __name__ == "__main__":
    main()
