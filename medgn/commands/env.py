"""``medgn env``: print library versions, CPU threads, CUDA devices and the GroupNorm backend."""

from __future__ import annotations

import argparse
import json

from medgn.environment import describe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("env", help="show versions, devices and the GroupNorm backend")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for name, version in info["versions"].items():
        print(f"{name:<12} {version or 'not installed'}")
    print(f"{'cpu threads':<12} {info['cpu_threads']} (of {info['cpu_count']} cores)")
    if info["cuda_devices"]:
        for dev in info["cuda_devices"]:
            print(
                f"{'cuda:' + str(dev['index']):<12} {dev['name']}, {dev['memory_gib']} GiB, sm "
                f"{dev['capability']}, bf16={dev['bf16']}"
            )
    else:
        print(f"{'cuda':<12} no CUDA device")
    print(f"{'groupnorm':<12} cpu: {info['group_norm_backend']['cpu']}; cuda: {info['group_norm_backend']['cuda']}")
    return 0
