"""Secrets never reach disk: a real 1-rank pretraining run streams its shards from a real S3
endpoint (moto) with the secret key given in the YAML storage options AND as a command-line
override, wandb offline on; no file the run writes (config copies, logs, metrics, checkpoints,
wandb's run files) holds the key or the secret. Credentials inside s3:// URLs are refused in one
redacted line; presigned URLs are redacted wherever they are logged."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from fixtures.training import run_training, write_ds_config, write_train_config, real_data_section

pytestmark = [pytest.mark.s3, pytest.mark.distributed]

BUCKET = "vilbert-secrets"
PRESIGNED = ("https://bucket.s3.amazonaws.com/cc/cc-000000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAPRESIGNED%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
             "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=TOKENSECRET"
             "&X-Amz-Signature=SIGNATURESECRET")


def _files_holding(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


def test_no_secret_in_any_file_of_a_real_run(moto_s3, synthetic_shards, minilm_dir, tmp_path):
    import s3fs

    opts = moto_s3.storage_options()
    moto_s3.create_bucket(BUCKET)
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(synthetic_shards.out), f"{BUCKET}/syn", recursive=True)

    data = real_data_section(synthetic_shards.manifest, minilm_dir)
    data.update(train=f"s3://{BUCKET}/syn/manifest.json", storage_options=opts, num_workers=1)
    cfg = write_train_config(tmp_path / "run.yaml", tmp_path / "run", data=data,
                             model={"config": "tiny", "overrides": {}},
                             train={"total_steps": 2, "save_every": 2},
                             metrics={"wandb": "offline", "log_every": 1})
    assert moto_s3.secret_key in (tmp_path / "run.yaml").read_text()  # the user's file holds it; ours must not
    ds = write_ds_config(tmp_path / "ds.json", stage=2, micro=2)
    out = run_training(1, ["--config", str(cfg), "--deepspeed", str(ds),
                           f"data.storage_options.secret={moto_s3.secret_key}",
                           f"data.storage_options.key={moto_s3.access_key}"],
                       entry=["-m", "vilbert_ds.pretrain"], timeout=240)

    run = tmp_path / "run"
    assert "pretrain done: step 2" in out.stdout, out.stdout[-3000:]
    wandb_files = list((run / "wandb").rglob("*.wandb"))
    assert wandb_files and b"data.storage_options.secret=***" in wandb_files[0].read_bytes()  # recorded, redacted
    assert (run / "checkpoints" / "step00000002" / "vilbert_ds.json").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["storage_options"]["secret"] == "***"
    assert _files_holding(run, [moto_s3.secret_key, moto_s3.access_key]) == []
    assert moto_s3.secret_key not in out.stdout


@pytest.mark.parametrize("command", [
    ["shards", "verify", "s3://AKIAINURL:SECRETINURL@bucket/cc/manifest.json"],
    ["pretrain", "--config", "demo", "--deepspeed", "ds_configs/cpu_small.json",
     "data.train=s3://AKIAINURL:SECRETINURL@bucket/cc/manifest.json"],
])
def test_credentials_in_an_s3_url_are_refused_in_one_redacted_line(command, capfd):
    from vilbert_ds.cli import main

    assert main(command) == 2
    captured = capfd.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and "s3://***@bucket/cc/manifest.json" in err[0] and "storage options" in err[0], err
    assert "SECRETINURL" not in captured.err + captured.out and "AKIAINURL" not in captured.err + captured.out


def test_presigned_and_userinfo_urls_are_redacted():
    from vilbert_ds.data.config import redact, redact_argv

    text = redact(f"reading {PRESIGNED} failed")
    for secret in ("AKIAPRESIGNED", "TOKENSECRET", "SIGNATURESECRET"):
        assert secret not in text
    assert "X-Amz-Expires=3600" in text and "X-Amz-Signature=***" in text
    assert redact("https://acct.blob.core.windows.net/c/x.tar?sv=2022&sp=r&sig=AZSIG") .endswith("sp=r&sig=***")
    assert redact("https://u:pw@host/a?Signature=S&AWSAccessKeyId=K&Expires=1") == \
        "https://***@host/a?Signature=***&AWSAccessKeyId=***&Expires=1"
    assert redact({"storage_options": {"key": "K", "secret": "S", "anon": False}, "task_specific_tokens": True}) == \
        {"storage_options": {"key": "***", "secret": "***", "anon": False}, "task_specific_tokens": True}
    argv = redact_argv(["--config", "c.yaml", "data.storage_options.secret=S1", 'ds.comet={"api_key": "S2"}',
                        "data.storage_options={key: K3, secret: S3, endpoint_url: 'http://x'}", f"data.val={PRESIGNED}",
                        "model.overrides.hidden_size=32"])
    assert not any(s in " ".join(argv) for s in ("S1", "S2", "K3", "S3", "SIGNATURESECRET", "TOKENSECRET"))
    assert "model.overrides.hidden_size=32" in argv and "data.storage_options.secret=***" in argv


def test_a_failing_presigned_read_is_logged_without_its_signature(moto_s3, caplog):
    from vilbert_ds.data.storage import RangeReader, ShardReadError, read_bytes

    url = (f"{moto_s3.endpoint}/{BUCKET}-missing/x.tar?X-Amz-Credential=AKIAPRESIGNED&X-Amz-Security-Token=TOKENSECRET"
           "&X-Amz-Signature=SIGNATURESECRET")
    with caplog.at_level(logging.INFO):
        with pytest.raises((ShardReadError, FileNotFoundError)) as e:
            list(RangeReader(url, 0, 1024, chunk_bytes=4096, retries=1, backoff_s=0.01))
        with pytest.raises(Exception) as e2:
            read_bytes(url.replace("x.tar", "manifest.json"), retries=1, backoff_s=0.01)
    shown = str(e.value) + str(e2.value) + caplog.text
    assert "SIGNATURESECRET" not in shown and "TOKENSECRET" not in shown, shown
