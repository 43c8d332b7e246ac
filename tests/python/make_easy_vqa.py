"""The easy-VQA dataset (PyPI `easy-vqa`: 64x64 pictures of one shape, 13 answers) in the reference
ALBEF's VQA layout, for services/albef/tests/finetune.rs.

    make_easy_vqa.py OUT TRAIN TEST

writes into OUT: vqa_train.json (the first TRAIN training questions) and vqa_test.json (the first
TEST test questions), rows {"question_id", "question", "image", "answer", "dataset": "vqa"} with
the one easy-VQA answer as ten agreeing human answers (VQA v2 has ten); answer_list.json (the
13 answers); vocab.txt: the BERT vocabulary of VOCAB (a file of tokens, one per line) followed by
the words of the questions and answers it lacks; and the majority answer's share of the test
questions on stdout as JSON.
"""
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from easy_vqa import get_answers, get_test_image_paths, get_test_questions, get_train_image_paths, get_train_questions


def rows(questions, paths, count, split, images):
    texts, answers, image_ids = questions
    out = []
    for i, (q, a, image_id) in enumerate(list(zip(texts, answers, image_ids))[:count]):
        name = f"{split}/{image_id}.png"
        target = images / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(paths[image_id], target)
        out.append({"question_id": i, "question": q, "image": name, "answer": [a] * 10, "dataset": "vqa"})
    return out


def main():
    out, train_n, test_n, vocab = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    out.mkdir(parents=True, exist_ok=True)
    train = rows(get_train_questions(), get_train_image_paths(), train_n, "train", out)
    test = rows(get_test_questions(), get_test_image_paths(), test_n, "test", out)
    (out / "vqa_train.json").write_text(json.dumps(train))
    (out / "vqa_test.json").write_text(json.dumps(test))
    (out / "answer_list.json").write_text(json.dumps(get_answers()))
    tokens = vocab.read_text().split("\n")
    tokens = [t for t in tokens if t]
    words = sorted({w.strip("?") for r in train + test for w in r["question"].lower().split()} | set(get_answers()))
    tokens += [w for w in words if w not in tokens]
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    majority, count = Counter(r["answer"][0] for r in test).most_common(1)[0]
    print(json.dumps({"majority": majority, "majority_share": 100.0 * count / len(test), "vocab": len(tokens)}))


if __name__ == "__main__":
    main()
