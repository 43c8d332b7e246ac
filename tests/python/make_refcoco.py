"""A small RefCOCO+ in the refer toolkit's files, and the reference's grounding scores of it.

Usage: make_refcoco.py OUT_DIR

Writes to OUT_DIR:
- refs_p2.p: the refs list as Python 3's pickle.dump writes it at protocol 2;
- refs_p0_py2.p, refs_p2_py2.p: the same as Python 2 wrote them (byte strings: STRING lines at
  protocol 0, SHORT_BINSTRING / BINSTRING at protocol 2), its default protocol 0 as the real
  refs(unc).p files are;
- refs.json: the same list as JSON;
- instances.json (COCO: images, annotations with segmentations, categories), dets.json (proposals
  with a detector score column);
- up_<ref_id>.f32: each expression's heat map upsampled as the reference does (little-endian f32);
- expected.json: per expression its map, each proposal's score, the chosen box and its IoU as
  ALBEF's dataset/utils.py grounding_eval and computeIoU compute them (copied below), and the
  accuracies per split.
"""

import json
import os
import pickle
import struct
import sys

import torch
import torch.nn.functional as F

ALPHA = 0.5


def computeIoU(box1, box2):
    # ALBEF dataset/utils.py, verbatim.
    inter_x1 = max(box1[0], box2[0])
    inter_y1 = max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)

    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union


def reference_choice(pred, dets, image, ref_box, mask_size):
    """grounding_eval's body for one result (on the CPU), also returning every score."""
    mask = pred.view(1, 1, mask_size, mask_size)
    mask = F.interpolate(mask, size=(image['height'], image['width']), mode='bicubic').squeeze()
    max_score = 0
    scores = []
    for i, det in enumerate(dets):
        score = mask[int(det[1]):int(det[1] + det[3]), int(det[0]):int(det[0] + det[2])]
        area = det[2] * det[3]
        score = score.sum() / area ** ALPHA
        scores.append(float(score))
        if score > max_score:
            pred_box = det[:4]
            max_score = score
            chosen = i
    return mask, scores, chosen, pred_box, computeIoU(ref_box, pred_box)


class Py2Pickler(pickle._Pickler):
    """Python 2's pickler for byte strings (its str): STRING reprs, or SHORT_BINSTRING/BINSTRING."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if self.bin:
            if len(obj) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
            else:
                self.write(pickle.BINSTRING + struct.pack('<i', len(obj)) + obj)
        else:
            self.write(pickle.STRING + repr(obj)[1:].encode('ascii') + b'\n')
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def as_py2(v):
    """Python 2's view of the refs: ASCII text as byte strings, other text as unicode."""
    if isinstance(v, dict):
        return {as_py2(k): as_py2(x) for k, x in v.items()}
    if isinstance(v, list):
        return [as_py2(x) for x in v]
    if isinstance(v, str) and v.isascii():
        return v.encode('ascii')
    return v


IMAGES = [(1001, 37, 53), (1002, 64, 48), (1003, 96, 128), (1004, 240, 320), (1005, 427, 640)]
SPLITS = ['train', 'val', 'testA', 'testB']


def random_box(g, height, width):
    x = float(torch.rand(1, generator=g)) * width * 0.9
    y = float(torch.rand(1, generator=g)) * height * 0.9
    # Some run past the border; coordinates are fractional as a detector's are.
    w = 1.0 + float(torch.rand(1, generator=g)) * (width - x) * 1.2
    h = 1.0 + float(torch.rand(1, generator=g)) * (height - y) * 1.2
    return [round(x, 2), round(y, 2), round(w, 2), round(h, 2)]


def dataset(g):
    images, anns, refs, dets = [], [], [], {}
    ann_id, ref_id = 50000, 700
    for image_id, height, width in IMAGES:
        images.append({'id': image_id, 'height': height, 'width': width, 'file_name': 'COCO_train2014_%012d.jpg' % image_id})
        boxes = [random_box(g, height, width) for _ in range(40 + image_id % 7 * 20)]
        for k in range(2):
            ann_id += 1
            ref_id += 1
            bbox = random_box(g, height, width)
            anns.append({'id': ann_id, 'image_id': image_id, 'bbox': bbox, 'area': bbox[2] * bbox[3], 'iscrowd': 0,
                         'category_id': 1, 'segmentation': [[bbox[0], bbox[1], bbox[0] + bbox[2], bbox[1], bbox[0], bbox[1] + bbox[3]]]})
            # A near copy of the target among the proposals, so that some choices are right.
            boxes.append([round(bbox[0] + 1.3, 2), round(bbox[1] - 0.7, 2), bbox[2], round(bbox[3] + 2.1, 2)])
            raw = 'the man on the left' if k == 0 else u'caf\xe9 sign \u4e2d, left\\'
            refs.append({'sent_ids': [ref_id * 10], 'file_name': 'COCO_train2014_%012d_%d.jpg' % (image_id, ann_id),
                         'ann_id': ann_id, 'ref_id': ref_id, 'image_id': image_id,
                         'split': SPLITS[ref_id % 4], 'category_id': 1,
                         'sentences': [{'tokens': raw.split(), 'raw': raw, 'sent_id': ref_id * 10, 'sent': raw}]})
        # A string of 256 bytes or more: Python 2 writes it as a BINSTRING at protocol 2.
        refs[-1]['note'] = 'n' * (200 + image_id % 100 * 20)
        dets[str(image_id)] = [b + [round(float(torch.rand(1, generator=g)), 4)] for b in boxes]
    instances = {'info': {}, 'images': images, 'annotations': anns,
                 'categories': [{'id': 1, 'name': 'person', 'supercategory': 'person'}]}
    return refs, instances, dets


def heat_map(g, grid, ref, image, bbox):
    """A Grad-CAM-like map: positive, peaky, hot near the target half the time."""
    pred = torch.rand(grid, grid, generator=g) ** 3
    if ref['ref_id'] % 2 == 0:
        cx = int((bbox[0] + bbox[2] / 2) / image['width'] * grid)
        cy = int((bbox[1] + bbox[3] / 2) / image['height'] * grid)
        pred[max(cy - 1, 0):cy + 2, max(cx - 1, 0):cx + 2] += 3.0
    return pred


def expectations(g, out, refs, instances, dets):
    images = {i['id']: i for i in instances['images']}
    anns = {a['id']: a for a in instances['annotations']}
    cases, counts = [], {s: [0, 0] for s in ['val', 'testA', 'testB']}
    for n, ref in enumerate(refs):
        grid = 16 if n % 3 == 0 else 24
        image, bbox = images[ref['image_id']], anns[ref['ann_id']]['bbox']
        pred = heat_map(g, grid, ref, image, bbox)
        up, scores, chosen, box, iou = reference_choice(pred, dets[str(ref['image_id'])], image, bbox, grid)
        ranked = sorted(scores, reverse=True)
        # f64 sums choose as fp32 sums do only away from ties.
        assert ranked[0] > 0 and ranked[0] - ranked[1] > 1e-3 * ranked[0], (ref['ref_id'], ranked[:2])
        up.numpy().astype('<f4').tofile(os.path.join(out, 'up_%d.f32' % ref['ref_id']))
        cases.append({'ref_id': ref['ref_id'], 'image_id': ref['image_id'], 'split': ref['split'], 'bbox': bbox,
                      'height': image['height'], 'width': image['width'], 'grid': grid,
                      'map': [float(v) for v in pred.flatten()], 'scores': scores, 'chosen': chosen,
                      'box': box, 'iou': iou})
        if ref['split'] in counts:
            counts[ref['split']][0] += int(iou >= 0.5)
            counts[ref['split']][1] += 1
    accuracies = [[s, 100.0 * c / t] for s, (c, t) in counts.items() if t > 0]
    return {'cases': cases, 'accuracies': accuracies}


def main():
    out = sys.argv[1]
    g = torch.Generator().manual_seed(7)
    refs, instances, dets = dataset(g)
    with open(os.path.join(out, 'refs_p2.p'), 'wb') as f:
        pickle.dump(refs, f, protocol=2)
    for protocol in [0, 2]:
        with open(os.path.join(out, 'refs_p%d_py2.p' % protocol), 'wb') as f:
            Py2Pickler(f, protocol=protocol).dump(as_py2(refs))
    for name, value in [('refs.json', refs), ('instances.json', instances), ('dets.json', dets)]:
        with open(os.path.join(out, name), 'w') as f:
            json.dump(value, f)
    expected = expectations(g, out, refs, instances, dets)
    with open(os.path.join(out, 'expected.json'), 'w') as f:
        json.dump(expected, f)
    right = sum(c['iou'] >= 0.5 for c in expected['cases'])
    print(json.dumps({'cases': len(expected['cases']), 'right': right}))


if __name__ == '__main__':
    main()
