"""Write the generated COCO-format shapes set (data/shapes.py):  python -m tools.make_shapes_coco ROOT

    python -m tools.make_shapes_coco work_dirs/shapes_coco --train 200 --val 50 --size 128

ROOT gets annotations/instances_{train,val}2017.json and train2017/, val2017/ (the standard layout that
``data.dataset: coco`` reads); the same --seed writes the same files.
"""
import argparse


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a small COCO-format detection set of coloured shapes.")
    p.add_argument("root", help="output folder")
    p.add_argument("--train", type=int, default=200, help="training images (default 200)")
    p.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    p.add_argument("--size", type=int, default=128, help="shorter image side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from data.shapes import make_shapes_coco
    make_shapes_coco(args.root, {"train2017": args.train, "val2017": args.val}, args.size, seed=args.seed)
    print(f"wrote {args.train} + {args.val} images to {args.root}")


if __name__ == "__main__":
    main()
