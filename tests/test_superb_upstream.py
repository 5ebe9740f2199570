"""The s3prl upstream (`mt4ssl.superb.upstream`): output contract and s3prl's frame checks,
padding invariance, registration on s3prl.hub for S3PRLUpstream and the runner, training and
converted checkpoints, URLs through s3prl's download helper, and refusal of files that are
not mt4ssl checkpoints (a malicious pickle never runs)."""

from __future__ import annotations

import functools
import http.server
import math
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("s3prl")

import s3prl.hub  # noqa: E402
from s3prl.nn import S3PRLUpstream  # noqa: E402
from s3prl.upstream.interfaces import TOLERABLE_SEQLEN_DIFF, Featurizer  # noqa: E402

import mt4ssl.superb  # noqa: E402
from mt4ssl.cli import main  # noqa: E402
from mt4ssl.config import config_to_dict  # noqa: E402
from mt4ssl.errors import InputError  # noqa: E402
from mt4ssl.models.checkpoint import load_model, save_checkpoint  # noqa: E402
from mt4ssl.models.cnn import num_frames  # noqa: E402
from mt4ssl.models.mt4ssl import MT4SSL  # noqa: E402
from mt4ssl.superb.upstream import UpstreamExpert, mt4ssl_local, mt4ssl_url  # noqa: E402
from tests.conftest import small_model_config, write_tree  # noqa: E402
from tests.test_checkpoint import fairseq_model_cfg  # noqa: E402

LENGTHS = [16000, 12345, 20111]  # awkward on purpose: 49, 38 and 62 frames


def waves(lengths=LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [0.3 * torch.sin(torch.arange(n) * 0.03) + 0.1 * torch.randn(n, generator=g) for n in lengths]


def hubert_like_config():
    """Converted-HuBERT geometry: GroupNorm CNN ("default"), one kernel-16 positional conv."""
    return small_model_config(extractor_mode="default", pos_conv_depth=1, pos_conv_kernel=16, targets=(),
                              normalize=False)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


@pytest.fixture(scope="module")
def registered():
    mt4ssl.superb.register()
    mt4ssl.superb.register()  # idempotent
    return s3prl.hub


def model_states(path: Path, wav: torch.Tensor) -> list[torch.Tensor]:
    """The model's own hidden states for one utterance, (T, D) each."""
    with torch.no_grad():
        return [h[0] for h in load_model(path).extract_features(wav[None])[0]]


# ---------------------------------------------------------------------------- contract


def test_output_contract_and_s3prl_frame_checks(ckpt):
    upstream = mt4ssl_local(str(ckpt))
    assert isinstance(upstream, UpstreamExpert) and not upstream.training
    assert upstream.get_downsample_rates("hidden_states") == 320
    assert upstream.get_downsample_rates("last_hidden_state") == 320
    assert not any(".targets." in f".{name}" for name, _ in upstream.named_parameters())  # heads, teacher dropped

    wavs = waves()
    with torch.no_grad():
        out = upstream(wavs)
    states = out["hidden_states"]
    T = num_frames(max(LENGTHS))
    assert len(states) == upstream.model.cfg.num_layers + 1 == 4
    for h in states:
        assert h.shape == (3, T, 64) and h.dtype == torch.float32 and torch.isfinite(h).all()
    assert out["last_hidden_state"] is states[-1] and out["hidden_state_0"] is states[0]
    # the legacy runner's rule (within 5 of round(n / 320)) and S3PRLUpstream's (ceil(n / 320),
    # matched by repeating or trimming at most one frame's worth)
    assert abs(T - round(max(LENGTHS) / 320)) < TOLERABLE_SEQLEN_DIFF
    assert 0 <= math.ceil(max(LENGTHS) / 320) - T <= 2
    featurizer = Featurizer(upstream, upstream_device="cpu")  # s3prl's own: its start-up forward + checks
    assert featurizer.downsample_rate == 320 and featurizer.output_dim == 64
    with torch.no_grad():
        feats = featurizer(wavs, upstream(wavs))
    assert [f.shape[0] for f in feats] == [min(round(n / 320), T) for n in LENGTHS]

    # shorter than the CNN's 400-sample receptive field: zero-padded to one frame
    with torch.no_grad():
        short = upstream([torch.randn(200), torch.randn(900)])["hidden_states"]
    assert short[0].shape == (2, num_frames(900), 64)
    with pytest.raises(ValueError, match="not non-empty 1-D"):
        upstream([torch.randn(2, 800)])


@pytest.mark.parametrize("kind", ["data2vec_pos_conv", "hubert_like"])
def test_padding_invariance(tmp_path, kind):
    torch.manual_seed(1)
    cfg = small_model_config() if kind == "data2vec_pos_conv" else hubert_like_config()
    save_checkpoint(tmp_path / "m.pt", MT4SSL(cfg))
    upstream = mt4ssl_local(str(tmp_path / "m.pt"))
    wavs = waves(seed=1)
    with torch.no_grad():
        alone = [upstream([w])["hidden_states"] for w in wavs]
        for padded_batch in (False, True):  # groups of equal length (CPU); one padded batch (GPU)
            upstream.pad_on_cpu = padded_batch
            batch = upstream(wavs)["hidden_states"]
            T = batch[0].shape[1]
            for i, n in enumerate(LENGTHS):
                t = num_frames(n)
                for layer, h in enumerate(batch):
                    torch.testing.assert_close(h[i, :t], alone[i][layer][0], atol=1e-5, rtol=1e-5)
                    assert torch.equal(h[i, t:], h[i, t - 1].expand(T - t, -1))  # past its end: its last frame

        # a zero-padded batch through the model as fairseq runs it leaks (positional conv blocks
        # 2-5; GroupNorm over time in "default" mode); exact_padding (the upstream's) zeroes the
        # padding before every positional-conv block, which is exact unless GroupNorm is there:
        # then the upstream runs groups of equal length
        model = upstream.model
        pad = torch.arange(max(LENGTHS))[None] >= torch.tensor(LENGTHS)[:, None]
        wav = torch.stack([F.pad(w, (0, pad.shape[1] - len(w))) for w in wavs])
        leaks = {}
        for exact in (False, True):
            model.encoder.exact_padding = exact
            padded, frame_pad = model.extract_features(wav, pad)
            leaks[exact] = max((padded[layer][i, :num_frames(n)] - alone[i][layer][0]).abs().max().item()
                               for i, n in enumerate(LENGTHS) for layer in range(len(batch)))
        model.encoder.exact_padding = True
    print(f"{kind}: a zero-padded batch differs from the utterances alone by up to {leaks}")
    assert leaks[False] > 1e-3
    if kind == "data2vec_pos_conv":
        assert leaks[True] < 1e-5 and upstream.exact_batches
    else:
        assert leaks[True] > 1e-3 and not upstream.exact_batches


# ---------------------------------------------------------------------------- s3prl.hub, S3PRLUpstream


def test_registered_on_s3prl_hub_and_loaded_by_s3prl_upstream(ckpt, registered):
    assert registered.mt4ssl_local is mt4ssl_local and registered.mt4ssl_url is mt4ssl_url
    assert {"mt4ssl_local", "mt4ssl_url"} <= set(S3PRLUpstream.available_names())
    # the legacy runner's call: getattr(hub, NAME)(ckpt=..., model_config=..., refresh=...)
    assert isinstance(getattr(s3prl.hub, "mt4ssl_local")(ckpt=str(ckpt), model_config=None, refresh=False),
                      UpstreamExpert)

    upstream = S3PRLUpstream("mt4ssl_local", path_or_url=str(ckpt)).eval()
    assert upstream.num_layers == 4 and upstream.downsample_rates == [320] * 4 and upstream.hidden_sizes == [64] * 4
    wavs = waves()
    n = LENGTHS[0]
    with torch.no_grad():
        hs, hs_len = upstream(wavs[0][None], torch.tensor([n]))
    own = model_states(ckpt, wavs[0])
    t = num_frames(n)
    assert hs_len[0].tolist() == [math.ceil(n / 320)] and hs[0].shape[1] == math.ceil(n / 320) == t + 1
    for h, ref in zip(hs, own, strict=True):
        torch.testing.assert_close(h[0, :t], ref, atol=1e-6, rtol=1e-6)
        assert torch.equal(h[0, t:], ref[-1:])  # S3PRLUpstream's own padding: the last frame repeated

    # a batch through S3PRLUpstream gives every utterance its output alone, over its whole length
    wav = torch.stack([F.pad(w, (0, max(LENGTHS) - len(w))) for w in wavs])
    with torch.no_grad():
        hs, hs_len = upstream(wav, torch.tensor(LENGTHS))
        for i, w in enumerate(wavs):
            one, one_len = upstream(w[None], torch.tensor([len(w)]))
            assert hs_len[0][i] == one_len[0][0]
            for h, o in zip(hs, one, strict=True):
                torch.testing.assert_close(h[i, : one_len[0][0]], o[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- checkpoint kinds


@pytest.fixture(scope="module")
def training_run(tmp_path_factory) -> Path:
    """A 2-update `mt4ssl pretrain` run of a tiny model (manifests, MFCC k-means labels)."""
    from mt4ssl.config import load_config
    from mt4ssl.train import pretrain
    from mt4ssl.train.config import PretrainConfig
    from tests.test_train import SMALL_MODEL

    root = tmp_path_factory.mktemp("train")
    write_tree(root / "libri", {"train": [32001, 40007, 35555, 33333], "valid": [33001, 38319]})
    m, f, lab = root / "m", root / "f", root / "lab"
    assert main(["manifest", str(root / "libri"), "--out", str(m)]) == 0
    for split in ("train", "valid"):
        assert main(["features", "mfcc", str(m), split, str(f)]) == 0
    assert main(["kmeans", str(f), "train", str(lab / "km.npz"), "-k", "4", "--fraction", "1"]) == 0
    for split in ("train", "valid"):
        assert main(["labels", str(f), split, str(lab / "km.npz"), "--manifest-dir", str(m), "--out", str(lab)]) == 0
    cfg = load_config(PretrainConfig, None, [
        f"data.manifest_dir={m}", f"data.labels={{km: {lab}}}", "data.max_tokens=100000", "data.num_workers=0",
        f"run.out_dir={root / 'run'}", "run.max_updates=2", "run.device=cpu", *SMALL_MODEL])
    assert pretrain.train(cfg)["num_updates"] == 2
    return root / "run" / "checkpoints"


@pytest.mark.parametrize("name", ["checkpoint_last.pt", "checkpoint_best.pt"])
def test_training_checkpoint_loads(training_run, registered, name):
    path = training_run / name
    state = torch.load(path, weights_only=True)
    assert {"optimizer", "scheduler", "num_updates"} <= set(state)  # a real training checkpoint
    upstream = S3PRLUpstream("mt4ssl_local", path_or_url=str(path)).eval()
    assert upstream.num_layers == 3
    wav = waves()[1]
    with torch.no_grad():
        hs, _ = upstream(wav[None], torch.tensor([len(wav)]))
    for h, ref in zip(hs, model_states(path, wav), strict=True):
        torch.testing.assert_close(h[0, : ref.shape[0]], ref, atol=1e-6, rtol=1e-6)


def test_converted_fairseq_checkpoint_loads(tmp_path):
    """`mt4ssl convert fairseq` output of a HuBERT checkpoint loads; the fairseq file itself is refused."""
    torch.manual_seed(2)
    ours = MT4SSL(hubert_like_config())
    sd = dict(ours.state_dict())
    sd["final_proj.weight"], sd["final_proj.bias"] = torch.randn(8, 64), torch.randn(8)
    sd["label_embs_concat"] = torch.randn(12, 8)
    model_cfg = fairseq_model_cfg("hubert", ours.cfg)
    model_cfg.update(conv_pos=16, pos_conv_depth=1, ema_anneal_end_step=0)
    torch.save({"cfg": {"model": model_cfg, "task": {"normalize": False}}, "model": sd}, tmp_path / "hubert.pt")
    assert main(["convert", "fairseq", str(tmp_path / "hubert.pt"), str(tmp_path / "ours.pt")]) == 0

    upstream = mt4ssl_local(str(tmp_path / "ours.pt"))
    wavs = waves(seed=2)
    with torch.no_grad():
        batch = upstream(wavs)["hidden_states"]
        for i, w in enumerate(wavs):
            ref = [h[0] for h in ours.eval().extract_features(w[None])[0]]
            for h, r in zip(batch, ref, strict=True):
                torch.testing.assert_close(h[i, : r.shape[0]], r, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputError, match=r"hubert\.pt: not an mt4ssl checkpoint \(no format marker\)"):
        mt4ssl_local(str(tmp_path / "hubert.pt"))


class _Payload:
    """Unpickling this runs code that writes `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def test_files_that_are_not_mt4ssl_checkpoints_are_clear_errors(tmp_path, ckpt, registered):
    torch.save({"model": {}, "epoch": 3}, tmp_path / "plain.pt")
    with pytest.raises(InputError, match=r"plain\.pt: not an mt4ssl checkpoint \(no format marker\)"):
        mt4ssl_local(str(tmp_path / "plain.pt"))
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(InputError, match=r"notes\.txt: not an mt4ssl checkpoint"):
        mt4ssl_local(str(tmp_path / "notes.txt"))
    with pytest.raises(InputError, match=r"missing\.pt: checkpoint not found"):
        S3PRLUpstream("mt4ssl_local", path_or_url=str(tmp_path / "missing.pt"))
    broken = torch.load(ckpt, weights_only=True)
    del broken["model"]["post_extract_proj.weight"]
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(InputError, match=r"broken\.pt: an mt4ssl checkpoint whose model does not load"):
        mt4ssl_local(str(tmp_path / "broken.pt"))
    with pytest.raises(InputError, match="give the mt4ssl checkpoint"):
        mt4ssl_local(None)
    with pytest.raises(InputError, match="upstream.yaml: file not found.*carries the model's config"):
        mt4ssl_local(str(ckpt), model_config="upstream.yaml")
    (tmp_path / "up.yaml").write_text("layers: 3\n")
    with pytest.raises(InputError, match=r"up\.yaml: unknown upstream option\(s\) \['layers'\]"):
        mt4ssl_local(str(ckpt), model_config=str(tmp_path / "up.yaml"))
    (tmp_path / "up.yaml").write_text("precision: fp8\n")
    with pytest.raises(InputError, match="precision 'fp8'"):
        mt4ssl_local(str(ckpt), model_config=str(tmp_path / "up.yaml"))
    with pytest.raises(InputError, match=r"unknown option\(s\) \['layers'\]"):
        mt4ssl_local(str(ckpt), layers=3)


def test_precision_option(tmp_path, ckpt):
    """`-g FILE` with `precision: bf16`: the forward runs under bf16 autocast (close to fp32,
    not equal) and returns float32 states; auto follows the device (mt4ssl.utils.precision)."""
    (tmp_path / "bf16.yaml").write_text("precision: bf16\n")
    fp32, bf16 = mt4ssl_local(str(ckpt)), mt4ssl_local(str(ckpt), model_config=str(tmp_path / "bf16.yaml"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    wavs = waves(seed=3)
    with torch.no_grad():
        a, b = fp32(wavs)["hidden_states"], bf16(wavs)["hidden_states"]
    assert all(h.dtype == torch.float32 for h in b)
    for x, y in zip(a, b):
        assert not torch.equal(x, y)
        assert (x - y).abs().max() < 0.1 * x.abs().max()
    auto = mt4ssl_local(str(ckpt), precision="auto")
    with torch.no_grad():
        auto(wavs[:1])
    from mt4ssl.utils.precision import resolve_precision
    assert auto._dtypes["cpu"][0] == resolve_precision("auto", "cpu")[0]


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, ckpt):
    marker = tmp_path / "marker"
    state = torch.load(ckpt, weights_only=True)  # a real mt4ssl checkpoint, plus the payload
    torch.save({**state, "extra": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match=r"evil\.pt: not an mt4ssl checkpoint \(it does not load with weights_only"):
        mt4ssl_local(str(tmp_path / "evil.pt"))
    with pytest.raises(InputError, match=r"evil\.pt: not an mt4ssl checkpoint"):
        S3PRLUpstream("mt4ssl_local", path_or_url=str(tmp_path / "evil.pt"))
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the test's own check: the payload is real
    assert marker.read_text() == "payload ran"


# ---------------------------------------------------------------------------- URLs


@pytest.fixture
def http_root(tmp_path):
    """tmp_path/www served on 127.0.0.1 (a thread), s3prl's download cache in tmp_path/cache."""
    import s3prl.util.download as download

    www = tmp_path / "www"
    www.mkdir()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    saved = download._download_dir
    download.set_dir(tmp_path / "cache")
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        download.set_dir(saved)
        server.shutdown()
        server.server_close()


def test_url_is_downloaded_by_s3prl_and_cached(http_root, ckpt, registered, tmp_path):
    www, base = http_root
    (www / "model.pt").write_bytes(ckpt.read_bytes())
    upstream = S3PRLUpstream("mt4ssl_url", path_or_url=f"{base}/model.pt").eval()
    cached = list((tmp_path / "cache").glob("*.model.pt"))
    assert len(cached) == 1 and cached[0].read_bytes() == ckpt.read_bytes()
    assert isinstance(mt4ssl_local(f"{base}/model.pt"), UpstreamExpert)  # _local takes a URL too
    assert len(list((tmp_path / "cache").glob("*.model.pt"))) == 1  # from the cache
    wav = waves()[2]
    with torch.no_grad():
        hs, _ = upstream(wav[None], torch.tensor([len(wav)]))
    for h, ref in zip(hs, model_states(ckpt, wav), strict=True):
        torch.testing.assert_close(h[0, : ref.shape[0]], ref, atol=1e-6, rtol=1e-6)
    (www / "junk.pt").write_text("junk")
    with pytest.raises(InputError, match=r"junk\.pt: not an mt4ssl checkpoint"):
        mt4ssl_url(f"{base}/junk.pt")
    assert config_to_dict(load_model(cached[0]).cfg) == config_to_dict(load_model(ckpt).cfg)


def test_cache_of_a_frozen_upstream(ckpt):
    """cache_gb: the same states as without it, the upstream skipped for utterances seen before
    (by their samples), least recently used dropped past the limit, and never used while the
    upstream trains or under autograd."""
    plain, cached = mt4ssl_local(str(ckpt)), mt4ssl_local(str(ckpt), cache_gb=1.0)
    wavs = waves(seed=4)
    with torch.no_grad():
        ref = plain(wavs)["hidden_states"]
        first = cached(wavs)["hidden_states"]
        assert (cached.cache_hits, cached.cache_misses) == (0, len(wavs))
        again = cached(list(reversed(wavs)))["hidden_states"]  # another batch order: from the cache
        assert (cached.cache_hits, cached.cache_misses) == (len(wavs), len(wavs))
        changed = [wavs[0].clone()]
        changed[0][100] += 0.01  # other samples: computed
        cached(changed)
        assert cached.cache_misses == len(wavs) + 1
    for a, b in zip(ref, first):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for i, n in enumerate(LENGTHS):  # reversed order: utterance i is row len - 1 - i
        t = num_frames(n)
        for layer in range(len(ref)):
            assert torch.equal(again[layer][len(wavs) - 1 - i, :t], first[layer][i, :t])

    one = sum(h[0, :num_frames(LENGTHS[0])].numel() * 4 for h in ref)  # bytes of utterance 0's states
    small = mt4ssl_local(str(ckpt), cache_gb=1.5 * one / 2**30)  # room for one utterance like it
    with torch.no_grad():
        small([wavs[0]]); small([wavs[0]])
        assert (small.cache_hits, small.cache_misses) == (1, 1)
        small([wavs[1]]); small([wavs[0]])  # wavs[1] pushed wavs[0] out
        assert small.cache_misses == 3 and len(small._cache) == 1
    small.train()
    with torch.no_grad():
        small([wavs[1]])
    small.eval()
    small([wavs[1]])  # autograd on
    assert small.cache_misses == 3 and small.cache_hits == 1  # neither looked at the cache
    with pytest.raises(InputError, match="cache_gb -1"):
        mt4ssl_local(str(ckpt), cache_gb=-1)
