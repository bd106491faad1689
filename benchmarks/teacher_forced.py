"""The teacher-forced bound of `streammem eval drift`: before each chunk the shipped generator's
pipeline observes the true frames up to it (so nothing it made feeds forward), then generates the
chunk; per-chunk PSNR against the truth, averaged over seeds 20,000 and 20,001, 50 chunks of 2
frames. Its first-minus-last chunk is the degradation the content alone causes (what error
recycling cannot remove). Run: `python benchmarks/teacher_forced.py` (about a minute)."""
import numpy as np, torch
torch.set_num_threads(1)
from streammem.eval.generation import render_path, psnr
from streammem.pipelines.jobs import load_default_generator
from streammem.pipelines.generation import GenerationConfig

res = {}
for seed in (20000, 20001):
    gt = render_path(seed, 101, 64)
    pipe = load_default_generator(config=GenerationConfig(seed=0))
    pipe.start(gt[0].image, pose=gt[0].pose)
    per = []
    t = 1
    for c in range(50):
        frames = list(pipe.stream([g.pose for g in gt[t:t + 2]], progress=False))
        per.append(np.mean([psnr(f.image, gt[t + j].image) for j, f in enumerate(frames)]))
        # replace what it made by the truth: restart from the truth up to here
        pipe.start(gt[0].image, pose=gt[0].pose)
        for g in gt[1:t + 2]:
            pipe.step(g)
        t += 2
    res[seed] = per
m = np.mean([res[s] for s in res], 0)
print("teacher-forced PSNR first %.2f last %.2f degradation %+.2f; mean %.2f; chunks 0-5 %s" % (
    m[0], m[-1], m[0] - m[-1], m.mean(), np.round(m[:6], 2).tolist()))
