"""``graft-data``: fetch CIFAR, or write a generated stand-in (CIFAR or an ImageFolder tree) for trials
without the real data.

    graft-data download data --cifar 10 100           # CIFAR-10 and CIFAR-100 into data/
    graft-data stand-in-cifar data/generated-cifar10  # a small generated CIFAR-10 in the real file format
    graft-data stand-in-imagefolder data/generated-imagenet --classes 10 --image-size 64

A stand-in folder carries ``GENERATED_STAND_IN.txt``: the training scripts and every results tool then
label its runs "generated stand-in" and never compare them with the paper.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grafting.data.fake import MARKER_NAME, MAX_CIFAR_SPLIT, MAX_IMAGE_SIZE, is_generated_stand_in
from grafting.errors import DatasetNotFoundError, GraftingError, UsageError, first_line
from grafting.tools.flags import bounded
from grafting.train.cli import ArgumentParser, entry_point

__all__ = ["parse_args", "main"]


_positive = bounded(int, 1)
_seed = bounded(int, 0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of ``graft-data``."""
    parser = ArgumentParser(prog="graft-data", description="Fetch CIFAR, or write a generated stand-in dataset.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    download = commands.add_parser(
        "download",
        help="download CIFAR-10 and/or CIFAR-100 (needs the internet)",
        description="Download CIFAR into DIR (what --data of graft-cifar expects).",
    )
    download.add_argument("folder", metavar="DIR", help="where cifar-10-batches-py/ and cifar-100-python/ go")
    download.add_argument(
        "--cifar",
        type=int,
        nargs="+",
        choices=(10, 100),
        default=[10],
        help="which datasets: 10, 100 or both (default: 10)",
    )

    cifar = commands.add_parser(
        "stand-in-cifar",
        help="write a generated CIFAR-10/100 in the real file format",
        description="Write a generated CIFAR stand-in (learnable, but not CIFAR) into DIR.",
    )
    cifar.add_argument("folder", metavar="DIR", help="the --data folder to create")
    cifar.add_argument("--cifar", type=int, choices=(10, 100), default=10, help="10 or 100 classes (default: 10)")
    split = bounded(int, 1, MAX_CIFAR_SPLIT)
    cifar.add_argument(
        "--train-size", type=split, default=5000, help=f"training images, at most {MAX_CIFAR_SPLIT} (default: 5000)"
    )
    cifar.add_argument(
        "--test-size", type=split, default=1000, help=f"test images, at most {MAX_CIFAR_SPLIT} (default: 1000)"
    )
    cifar.add_argument("--seed", type=_seed, default=0, help="seed of the generator, >= 0 (default: 0)")

    folder = commands.add_parser(
        "stand-in-imagefolder",
        help="write a generated ImageFolder tree (train/, val/)",
        description="Write a generated ImageNet-style stand-in (JPEG files in class folders) into DIR.",
    )
    folder.add_argument("folder", metavar="DIR", help="the --data folder to create")
    folder.add_argument("--classes", type=_positive, default=10, help="class folders (default: 10)")
    folder.add_argument("--train-per-class", type=_positive, default=64, help="training images per class (default: 64)")
    folder.add_argument("--val-per-class", type=_positive, default=16, help="validation images per class (default: 16)")
    folder.add_argument(
        "--image-size",
        type=bounded(int, 8, MAX_IMAGE_SIZE),
        default=64,
        help=f"image side in pixels, 8 to {MAX_IMAGE_SIZE}, varied by a sixth per image (default: 64)",
    )
    folder.add_argument("--seed", type=_seed, default=0, help="seed of the generator, >= 0 (default: 0)")
    return parser.parse_args(argv)


def _check_download_folder(folder: str) -> None:
    """A one-line UsageError for a folder real CIFAR must not go into: a file, or a generated stand-in's folder
    (its marker would label the real data generated)."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{folder} is a file, not a folder; pass the folder CIFAR should go into")
    if is_generated_stand_in(path):
        raise UsageError(
            f"{folder} holds a generated stand-in ({MARKER_NAME}), which would label real CIFAR there as generated; "
            f"pass another folder"
        )


def _download(folder: str, classes: int) -> None:
    """Fetch CIFAR-``classes`` into ``folder``; without the internet, one line that says what to do instead."""
    import torchvision

    from grafting.data.cifar import load_cifar

    try:
        train, test = load_cifar(folder, classes, download=True)
    except DatasetNotFoundError as err:
        if not isinstance(err.__cause__, OSError):
            raise
        url = (torchvision.datasets.CIFAR10 if classes == 10 else torchvision.datasets.CIFAR100).url
        raise GraftingError(
            f"could not download CIFAR-{classes} into {folder} ({first_line(err.__cause__)}); "
            f"without internet access, fetch {url} elsewhere and unpack it into {folder}"
        ) from None
    print(f"CIFAR-{classes}: {len(train)} training and {len(test)} test images in {folder}")


@entry_point
def main(argv: list[str] | None = None) -> None:
    """``graft-data``: run the chosen command; failures (no internet, bad sizes) are one line."""
    args = parse_args(argv)
    if args.command == "download":
        _check_download_folder(args.folder)
        for classes in args.cifar:
            _download(args.folder, classes)
    elif args.command == "stand-in-cifar":
        from grafting.data.fake import write_fake_cifar

        write_fake_cifar(args.folder, args.cifar, train_size=args.train_size, test_size=args.test_size, seed=args.seed)
        print(
            f"wrote a GENERATED CIFAR-{args.cifar} stand-in ({args.train_size} training, {args.test_size} test "
            f"images) to {args.folder}; train with --data {args.folder}"
        )
    else:
        from grafting.data.fake import write_fake_imagefolder

        write_fake_imagefolder(
            args.folder,
            args.classes,
            train_per_class=args.train_per_class,
            val_per_class=args.val_per_class,
            image_size=args.image_size,
            seed=args.seed,
        )
        print(
            f"wrote a GENERATED ImageFolder stand-in ({args.classes} classes) to {args.folder}; train with "
            f"graft-imagenet --data {args.folder} --image-size {max(16, min(args.image_size, 224))}"
        )


if __name__ == "__main__":
    main(None)
