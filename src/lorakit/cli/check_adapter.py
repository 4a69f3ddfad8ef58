"""``lorakit check-adapter DIR --model M``: will this adapter serve as it trained?

Runs the checks ``lorakit serve`` runs before an adapter serves (serve/check.py): safetensors only,
shapes that fit the base, finite values, support for mixed batches, and the serve-parity fingerprint
(the adapted model's outputs on a fixed probe, recorded when lorakit saved it). Exit status 0 when it
passes, 2 with the failed check named otherwise.
"""

from __future__ import annotations

import json

from lorakit.serve.check import check_folder


def register(sub) -> None:
    p = sub.add_parser("check-adapter", help="will an adapter serve as it trained? (the server's "
                                             "load checks and serve-parity fingerprint)")
    p.add_argument("dir", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--model", required=True, help="the base model it will be served on")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    report = check_folder(args.dir, args.model)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{report['adapter']} on {report['base']}: OK to serve")
    print(f"  kind        {report['kind']}" + (f" (labels {report['labels']})" if report["labels"] else ""))
    print(f"  LoRA        r={report['r']} alpha={report['alpha']} targets={report['targets']}, "
          f"{report['parameters']:,} parameters in {report['tensors']} tensors")
    print(f"  parity      {report['parity']}")
    batching = "mixed with other adapters in one batch" if report["mixed_batches"] else \
        "one adapter per request (classification)"
    print(f"  batching    {batching}")
    print(f"  load+check  {report['load_seconds']} s")
    return 0
