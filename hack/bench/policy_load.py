import io, time, torch, statistics
torch.set_num_threads(1)
from rl_engine.ppo import Agent, agent_from_spec, policy_spec
a = Agent(4, 2)
sd = io.BytesIO(); torch.save(a.state_dict(), sd); sd = sd.getvalue()
class Greedy(torch.nn.Module):
    def __init__(self, actor): super().__init__(); self.actor = actor
    def forward(self, x): return self.actor(x)
ts = io.BytesIO(); torch.jit.save(torch.jit.script(Greedy(a.actor)), ts); ts = ts.getvalue()
spec = policy_spec(a)
def load_sd():
    m = agent_from_spec(spec); m.load_state_dict(torch.load(io.BytesIO(sd), weights_only=True)); return m.eval()
def load_ts():
    return torch.jit.load(io.BytesIO(ts)).eval()
for name, f in [("state_dict+class", load_sd), ("torchscript", load_ts)]*2:
    t = []
    for _ in range(50):
        t0 = time.perf_counter(); m = f(); t.append(time.perf_counter() - t0)
    x = torch.zeros(32, 4)
    t1 = []
    for _ in range(500):
        t0 = time.perf_counter(); m(x) if name == "torchscript" else m.actor(x); t1.append(time.perf_counter() - t0)
    print(name, f"load median {statistics.median(t)*1e3:.2f} ms; forward(32) median {statistics.median(t1)*1e6:.1f} us; bytes {len(sd) if 'state' in name else len(ts)}")
