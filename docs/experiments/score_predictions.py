"""Score predict's JSON lines against a CSV of true labels, as a user would check a model on pictures of their own:
python -m cnnrnn.predict CKPT OUT/pictures > pred.jsonl; python docs/experiments/score_predictions.py OUT/labels.csv
pred.jsonl [--sep ' ']

labels.csv: file (relative to its folder), labels (class names separated by --sep). Prints one JSON object: the
pictures scored, f1_samples, exact match, f1_micro (scikit-learn) and the class names predict used.
"""
import argparse
import csv
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("labels")
    parser.add_argument("predictions")
    parser.add_argument("--sep", default=" ")
    args = parser.parse_args()
    folder = Path(args.labels).resolve().parent
    with open(args.labels, newline="") as f:
        truth = {str((folder / r["file"]).resolve()): [x for x in r["labels"].split(args.sep) if x]
                 for r in csv.DictReader(f)}
    lines = [json.loads(line) for line in open(args.predictions)]
    classes = sorted(lines[0]["scores"])
    index = {c: i for i, c in enumerate(classes)}
    y_true = np.zeros((len(lines), len(classes)), bool)
    y_pred = np.zeros_like(y_true)
    for row, line in enumerate(lines):
        for name in truth[str(Path(line["image"]).resolve())]:
            y_true[row, index[name]] = True
        for name in line["labels"]:
            y_pred[row, index[name]] = True
    print(json.dumps({"pictures": len(lines), "f1_samples": round(f1_score(y_true, y_pred, average="samples",
                                                                          zero_division=1.0), 4),
                      "exact_match": round(float((y_true == y_pred).all(1).mean()), 4),
                      "f1_micro": round(f1_score(y_true, y_pred, average="micro"), 4), "classes": classes}))


if __name__ == "__main__":
    main()
