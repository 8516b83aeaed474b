"""MAE pretraining on SLURM: every flag of main_pretrain.py plus the SLURM ones (util/launcher.py).

    python submitit_pretrain.py --nodes 8 --ngpus 8 --partition PART --job_dir jobs/pretrain_large \
        --model mae_vit_large_patch16 --norm_pix_loss --mask_ratio 0.75 --data_path /path/to/imagenet \
        --batch_size 64 --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05

The job requeues itself on preemption and at its time limit; ``--dry_run`` prints the sbatch parameters."""
from util.launcher import launch

if __name__ == "__main__":
    launch("main_pretrain")
